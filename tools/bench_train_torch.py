#!/usr/bin/env python3
"""PyTorch side of `mmke bench train`: one optimizer step of the two scenes models the
experiments train most, the same architectures at the quick preset's sizes, batch and
optimizer, timed the same way. Prints one JSON line per model like mmke's.

- `scope-multimodal`, MSCKE's multimodal scope classifier: clip-tiny (width 64, 2 layers,
  4 heads; 96 px images, one 32-px patch per cell) with its vision tower and attribute probe
  frozen, A_t and A_i to 128, dot-product fusion through the object readout (the question's
  mean word embedding against each cell's expected attribute names, cosine, learned scale),
  squared-L2 similarity, BCE (eq. 11) plus 5 x the attention cross-entropy on both sides;
  Adam, lr 1e-3. Each step encodes an edit side and a query side.
- `vlm`, vlm-tiny-objects: the same frozen vision tower and probe, the object tokens
  (projector MLP 20 -> 128 -> 128, learned positions, the LM's embeddings of the names),
  referent and count tokens, an OPT decoder (width 128, 4 layers, 4 heads, ReLU, pre-LN,
  tied head) as a prefix LM; answer cross-entropy plus the referent loss; AdamW (weight decay
  0.01), warm-up then cosine, each gradient clipped to norm 1 (Burn clips per parameter);
  every `--text-every`-th batch is text only.

The shapes a step works on (vocabulary, token widths) come from mmke's own JSON line (its
`shapes`): tools/bench_train_compare.py passes them. Batches are random tokens and images of
those shapes, drawn before timing (mmke's include its batching, from preloaded images).

Timing: `--warmup` untimed steps, then `--steps` timed; steps/s over the timed ones.

    python tools/bench_train_torch.py --vocab 80 --scope-edit-tokens 14 ...
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTRIBUTE_CLASSES = [1 + 6, 1 + 8, 1 + 2]
PROBE_WIDTH = sum(ATTRIBUTE_CLASSES)
CELLS = 9


class QuickGelu(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ClipLayer(nn.Module):
    """A CLIP encoder layer: pre-LN attention and QuickGELU MLP."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2, self.act = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), QuickGelu()

    def forward(self, x, mask=None):
        b, t, d = x.shape
        h = self.ln1(x)
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class ClipText(nn.Module):
    def __init__(self, vocab, d=64, layers=2, heads=4, positions=64, eos=3):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, d)
        self.position_embedding = nn.Embedding(positions, d)
        self.layers = nn.ModuleList(ClipLayer(d, heads) for _ in range(layers))
        self.final_layer_norm = nn.LayerNorm(d)
        self.projection = nn.Linear(d, d, bias=False)
        self.eos = eos

    def forward(self, ids, padding):
        b, t = ids.shape
        x = self.token_embedding(ids) + self.position_embedding.weight[:t]
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        mask = causal.view(1, 1, t, t) | padding.view(b, 1, 1, t)
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x)
        # Pooled at the first end token.
        at = (ids == self.eos).int().argmax(1)
        return self.projection(x[torch.arange(b), at])


class ClipVision(nn.Module):
    """CLIP's vision tower: patches, class token, pre-LN encoder, post-LN on every token."""

    def __init__(self, d=64, layers=2, heads=4, image=96, patch=32):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(d))
        self.position_embedding = nn.Parameter(torch.randn((image // patch) ** 2 + 1, d) * 0.02)
        self.pre, self.post = nn.LayerNorm(d), nn.LayerNorm(d)
        self.layers = nn.ModuleList(ClipLayer(d, heads) for _ in range(layers))

    def forward(self, pixels):
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.pre(torch.cat([cls, x], 1) + self.position_embedding)
        for layer in self.layers:
            x = layer(x)
        return self.post(x)


def distributions(logits):
    """Each attribute's softmax, side by side."""
    return torch.cat([p.softmax(-1) for p in logits.split(ATTRIBUTE_CLASSES, -1)], -1)


class Readout(nn.Module):
    """The question-conditioned readout: cosine attention, identity-initialised projections."""

    def __init__(self, width):
        super().__init__()
        self.query = nn.Linear(width, width, bias=False)
        self.key = nn.Linear(width, width, bias=False)
        for lin in (self.query, self.key):
            nn.init.eye_(lin.weight)
        self.log_scale = nn.Parameter(torch.tensor([math.log(20.0)]))
        self.threshold = nn.Parameter(torch.tensor([2.0]))

    def forward(self, query, keys, values):
        unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        q, k = unit(self.query(query.unsqueeze(1))), unit(self.key(keys))
        logits = (q @ k.transpose(1, 2)) * self.log_scale.exp()
        return logits.softmax(-1) @ values, logits.squeeze(1)


def segment_mean(text, weights):
    return (text * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)


def word_keys(dist, class_names, cell_names):
    """Per cell token, the expected embedding of its attribute names plus the cell's name."""
    cells = torch.cat([torch.zeros(1, cell_names.shape[1]), cell_names], 0)
    return dist @ class_names + cells


class Names:
    """Ids of the probe classes', cells' and numbers' names (random, of the scenes' lengths),
    summed through an embedding table as mmke's embed_names (one lookup, one matmul)."""

    def __init__(self, vocab, counts):
        self.sets = []
        for lengths in counts:
            ids = torch.randint(4, vocab, (sum(lengths),))
            matrix = torch.zeros(len(lengths), max(sum(lengths), 1))
            col = 0
            for row, n in enumerate(lengths):
                matrix[row, col:col + n] = 1.0
                col += n
            self.sets.append((matrix, ids))

    def embed(self, table):
        return [m @ table(ids) for m, ids in self.sets]


# Name lengths in words: probe classes ("no object" has none), cells, numbers.
CLASS_LENGTHS = [0] + [1] * 6 + [0] + [1] * 8 + [0] + [1] * 2
CELL_LENGTHS = [2, 2, 2, 2, 1, 2, 2, 2, 2]


class ScopeClassifier(nn.Module):
    def __init__(self, vocab, dim=128):
        super().__init__()
        self.text = ClipText(vocab)
        self.vision = ClipVision().requires_grad_(False)
        self.visual_projection = nn.Linear(64, 64, bias=False).requires_grad_(False)
        self.probe = nn.Linear(64, PROBE_WIDTH).requires_grad_(False)
        self.align_text = nn.Linear(64, dim)
        self.align_image = nn.Linear(64, dim)
        self.readout = Readout(64)
        self.names = Names(vocab, [CLASS_LENGTHS, CELL_LENGTHS])

    def encode(self, ids, padding, focus, pixels):
        h_t = self.align_text(self.text(ids, padding))
        tokens = self.visual_projection(self.vision(pixels))
        dist = distributions(self.probe(tokens))
        aligned = self.align_image(tokens)
        classes, cells = self.names.embed(self.text.token_embedding)
        keys = word_keys(dist, classes, cells)
        query = segment_mean(self.text.token_embedding(ids), focus)
        image, logits = self.readout(query, keys[:, 1:], aligned[:, 1:])
        z = torch.cat([h_t, image.squeeze(1)], 1)
        text_only = torch.cat([h_t, torch.zeros_like(h_t)], 1)
        has_image = torch.ones(ids.shape[0], 1)
        return z * has_image + text_only * (1 - has_image), logits

    def loss(self, edit, query, labels, edit_cells, query_cells, attention_weight=5.0):
        z_e, edit_logits = self.encode(*edit)
        z, query_logits = self.encode(*query)
        log_rho = (-(z_e - z).pow(2).sum(1)).clamp_max(0.0)
        log_not = (1 - log_rho.exp()).clamp_min(1e-6).log()
        loss = -(labels * log_rho + (1 - labels) * log_not).mean()
        return loss + attention_weight * (F.cross_entropy(edit_logits, edit_cells)
                                          + F.cross_entropy(query_logits, query_cells))


class OptLayer(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, mask):
        b, t, d = x.shape
        h = self.ln1(x)
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        q = split(self.q(h) * (d // self.heads) ** -0.5)
        k, v = split(self.k(h)), split(self.v(h))
        scores = (q @ k.transpose(-1, -2)).masked_fill(mask, float("-inf"))
        x = x + self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.relu(self.fc1(self.ln2(x))))


class Vlm(nn.Module):
    def __init__(self, vocab, numbers, d=128, layers=4, heads=4, positions=160):
        super().__init__()
        self.vision = ClipVision().requires_grad_(False)
        self.visual_projection = nn.Linear(64, 64, bias=False).requires_grad_(False)
        self.probe = nn.Linear(64, PROBE_WIDTH).requires_grad_(False)
        self.first, self.second = nn.Linear(PROBE_WIDTH, d), nn.Linear(d, d)
        self.positions = nn.Parameter(torch.randn(1 + CELLS, d) * 0.1)
        self.readout = Readout(d)
        self.embed_tokens = nn.Embedding(vocab, d)
        self.embed_positions = nn.Embedding(positions + 2, d)
        self.layers = nn.ModuleList(OptLayer(d, heads) for _ in range(layers))
        self.final_layer_norm = nn.LayerNorm(d)
        self.names = Names(vocab, [CLASS_LENGTHS, CELL_LENGTHS, [1] * numbers])

    def prefix(self, pixels, text, mask):
        dist = distributions(self.probe(self.visual_projection(self.vision(pixels))))
        classes, cells, numbers = self.names.embed(self.embed_tokens)
        words = word_keys(dist, classes, cells)
        prefix = self.second(F.gelu(self.first(dist))) + self.positions + words
        occupied = 1 - dist[:, :, 0]
        referent, logits = self.readout(segment_mean(text, (mask == 2).float()),
                                        words[:, 1:], prefix[:, 1:])
        n = (torch.sigmoid(logits - self.readout.threshold) * occupied[:, 1:]).sum(1, keepdim=True)
        j = torch.arange(numbers.shape[0], dtype=torch.float32).view(1, -1)
        count = (-2 * (n - j).pow(2)).softmax(1) @ numbers
        return torch.cat([prefix, referent, count.unsqueeze(1)], 1), logits

    def forward(self, pixels, ids, mask):
        b, s = ids.shape
        text = self.embed_tokens(ids)
        logits = None
        if pixels is not None:
            prefix, logits = self.prefix(pixels, text, mask)
            text = torch.cat([prefix, text], 1)
            mask = torch.cat([mask[:, :1].expand(b, prefix.shape[1]), mask], 1)
        t = text.shape[1]
        on = mask.clamp_max(1)
        x = text + self.embed_positions(on.cumsum(1) * on - 1 + 2)
        in_prefix = mask == 2
        causal = torch.ones(t, t, dtype=torch.bool).triu(1).view(1, 1, t, t)
        blocked = (causal | (mask == 0).view(b, 1, 1, t)) \
            & ~(in_prefix.view(b, 1, t, 1) & in_prefix.view(b, 1, 1, t))
        for layer in self.layers:
            x = layer(x, blocked)
        out = self.final_layer_norm(x) @ self.embed_tokens.weight.t()
        return out[:, t - s:], logits

    def loss(self, pixels, ids, mask, targets, weights, referents, matches):
        logits, referent_logits = self(pixels, ids, mask)
        log_p = logits.log_softmax(-1).gather(2, targets.unsqueeze(-1)).squeeze(-1)
        loss = -(log_p * weights).sum() / weights.sum().clamp_min(1.0)
        if referent_logits is not None:
            x = referent_logits - self.readout.threshold
            bce = -(matches * F.logsigmoid(x) + (1 - matches) * F.logsigmoid(-x)).mean()
            loss = loss + F.cross_entropy(referent_logits, referents) + bce
        return loss


def lr_at(step, steps, lr=1e-3, warmup=50):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def timed(step, warmup, steps):
    for s in range(warmup):
        step(s)
    start = time.perf_counter()
    for s in range(warmup, warmup + steps):
        step(s)
    return steps / (time.perf_counter() - start)


def text_batch(b, seq, vocab):
    ids = torch.randint(4, vocab, (b, seq))
    padding = torch.zeros(b, seq, dtype=torch.bool)
    padding[b // 2:, seq - 2:] = True  # some rows shorter, as in a real batch
    ids[:, seq - 1] = 3
    return ids, padding


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--scope-batch", type=int, default=32)
    p.add_argument("--scope-edit-tokens", type=int, required=True)
    p.add_argument("--scope-query-tokens", type=int, required=True)
    p.add_argument("--vlm-batch", type=int, default=32)
    p.add_argument("--vlm-tokens", type=int, required=True)
    p.add_argument("--vlm-prompt-tokens", type=int, required=True)
    p.add_argument("--vlm-text-tokens", type=int, required=True)
    p.add_argument("--numbers", type=int, default=5)
    p.add_argument("--text-every", type=int, default=8)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    torch.manual_seed(0)
    results = []

    # The scope classifier.
    model = ScopeClassifier(args.vocab)
    optim = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    b, size = args.scope_batch, args.image_size

    def side(seq):
        ids, padding = text_batch(b, seq, args.vocab)
        focus = (~padding).float()
        return ids, padding, focus, torch.randn(b, 3, size, size)

    batches = [(side(args.scope_edit_tokens), side(args.scope_query_tokens),
                (torch.arange(b) % 2).float(), torch.randint(0, CELLS, (b,)),
                torch.randint(0, CELLS, (b,))) for _ in range(4)]

    def scope_step(s):
        loss = model.loss(*batches[s % len(batches)])
        loss.item()  # mmke reads each step's loss too
        optim.zero_grad()
        loss.backward()
        optim.step()

    results.append(("scope-multimodal", b, timed(scope_step, args.warmup, args.steps)))

    # The VLM.
    model = Vlm(args.vocab, args.numbers)
    params = [q for q in model.parameters() if q.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    b, total = args.vlm_batch, args.warmup + args.steps

    def lm_batch(seq, prompt, pixels):
        ids, padding = text_batch(b, seq, args.vocab)
        mask = torch.ones(b, seq, dtype=torch.long)
        mask[:, :prompt] = 2
        mask[padding] = 0
        targets = torch.randint(4, args.vocab, (b, seq))
        weights = torch.zeros(b, seq)
        weights[:, prompt - 1:prompt + 1] = 1.0
        images = torch.randn(b, 3, size, size) if pixels else None
        return (images, ids, mask, targets, weights, torch.randint(0, CELLS, (b,)),
                (torch.rand(b, CELLS) < 0.3).float())

    visual = [lm_batch(args.vlm_tokens, args.vlm_prompt_tokens, True) for _ in range(4)]
    text = [lm_batch(args.vlm_text_tokens, args.vlm_text_tokens - 2, False) for _ in range(2)]

    def vlm_step(s):
        text_turn = (s + 1) % max(args.text_every, 1) == 0
        batch = text[s % 2] if text_turn else visual[s % 4]
        loss = model.loss(*batch)
        loss.item()
        optim.zero_grad()
        loss.backward()
        for q in params:  # per-parameter norm clipping, as Burn's GradientClipping::Norm
            torch.nn.utils.clip_grad_norm_([q], 1.0)
        for group in optim.param_groups:
            group["lr"] = lr_at(s, total)
        optim.step()

    results.append(("vlm", b, timed(vlm_step, args.warmup, args.steps)))
    for name, batch, per_second in results:
        print(json.dumps({
            "implementation": "pytorch",
            "model": name,
            "backend": "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "batch": batch,
            "steps": args.steps,
            "steps_per_second": per_second,
        }))


if __name__ == "__main__":
    main()
