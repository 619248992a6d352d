//! An edit on a scene and the exact scope of its effect on questions about the same image.
//!
//! A question is well-posed when it is answerable on both S and S' (its referring expression
//! denotes the same single object in both); in scope iff its answer differs between them.
//! *Hard* questions ask the edited attribute through a referring expression of another kind
//! than the edit's, so only the image tells whether both expressions denote the edited object
//! (hard in-scope) or another one (hard out-of-scope). They are kept in matched pairs, one
//! in-scope and one out-of-scope with the same query-expression kind, so that within each
//! (edit kind, query kind, family) the text of a hard question says nothing about its label.
//! *Near* questions are the edit question with the referring expression's content word
//! changed to another object's ("the square" for "the circle"): out of scope.

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::Serialize;

use super::language::{Query, Ref, RefKind, absent_combination, all_queries};
use super::scene::{Edit, Scene};

/// A labelled question on the edit image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ScopeQuestion {
    pub q: String,
    pub a_before: String,
    pub a_after: String,
    pub in_scope: bool,
    pub hard: bool,
    pub near: bool,
    /// The cell (0-8, reading order) of the object the question refers to, on the unedited
    /// image: dense supervision for pre-training the base model (never read by an editor).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cell: Option<u8>,
    /// The cells of the objects a count or existence question picks out, on the unedited
    /// image (pre-training supervision, like `cell`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<u8>>,
    #[serde(skip)]
    pub query: Query,
}

/// An edit asked through one referring expression, with its labelled questions.
#[derive(Clone, Debug)]
pub struct EditCase {
    pub edit: Edit,
    pub after: Scene,
    /// The edit question: the edited attribute through `reference`.
    pub query: Query,
    pub reference: Ref,
    pub src: String,
    pub rephrase: String,
    pub scope: Vec<ScopeQuestion>,
}

impl EditCase {
    pub fn new(scene: &Scene, rng: &mut impl Rng) -> Self {
        let edit = scene.random_edit(rng);
        let after = scene.apply(&edit);
        // Any expression of another kind than the edited attribute that denotes the object
        // in S and in S'.
        let kinds: Vec<RefKind> = RefKind::ALL
            .into_iter()
            .filter(|k| k.attribute() != edit.attribute)
            .filter(|&k| {
                let r = Ref::of(k, scene, edit.object);
                r.resolve(scene) == Some(edit.object) && r.resolve(&after) == Some(edit.object)
            })
            .collect();
        let kind = *kinds
            .choose(rng)
            .expect("shape and position expressions always resolve (objects keep them distinct)");
        let reference = Ref::of(kind, scene, edit.object);
        let query = Query::Attribute(edit.attribute, reference);
        let template = rng.random_range(0..3);
        let src = query.text(template);
        let rephrase = query.text((template + 1 + rng.random_range(0..2)) % 3);
        let scope = label_scope(scene, &after, &edit, reference, template, rng);
        Self {
            edit,
            after,
            query,
            reference,
            src,
            rephrase,
            scope,
        }
    }

    pub fn hard_in_scope(&self) -> Option<&ScopeQuestion> {
        self.scope.iter().find(|q| q.hard && q.in_scope)
    }

    pub fn hard_out_of_scope(&self) -> Option<&ScopeQuestion> {
        self.scope.iter().find(|q| q.hard && !q.in_scope)
    }
}

/// Is `query` hard for an edit asked through `edit_ref`: the edited attribute through an
/// expression of another kind.
pub fn is_hard(query: Query, edit: &Edit, edit_ref: Ref) -> bool {
    matches!(query, Query::Attribute(a, r) if a == edit.attribute && r.kind() != edit_ref.kind())
}

fn label_scope(
    before: &Scene,
    after: &Scene,
    edit: &Edit,
    edit_ref: Ref,
    edit_template: usize,
    rng: &mut impl Rng,
) -> Vec<ScopeQuestion> {
    let mut queries = all_queries(&[before, after]);
    queries.push(absent_combination(before, rng));
    queries.sort();
    queries.dedup();

    let edit_query = Query::Attribute(edit.attribute, edit_ref);
    let mut labelled = Vec::new();
    // Hard candidates by query-expression kind: (in scope, out of scope).
    let mut hard: std::collections::BTreeMap<RefKind, (Vec<ScopeQuestion>, Vec<ScopeQuestion>)> =
        Default::default();
    for query in queries {
        if query == edit_query {
            continue; // the edit question itself is `src`
        }
        // Well-posed in both, and about the same object in both.
        if let Some(r) = query.reference()
            && (r.resolve(before).is_none() || r.resolve(before) != r.resolve(after))
        {
            continue;
        }
        let (Some(a_before), Some(a_after)) = (query.answer(before), query.answer(after)) else {
            continue;
        };
        let near = matches!(query, Query::Attribute(a, r)
            if a == edit.attribute && r.kind() == edit_ref.kind() && r != edit_ref);
        let question = ScopeQuestion {
            // A near question keeps the edit question's wording but for the expression.
            q: if near {
                query.text(edit_template)
            } else {
                query.random_text(rng)
            },
            in_scope: a_before != a_after,
            a_before,
            a_after,
            hard: is_hard(query, edit, edit_ref),
            near,
            cell: query
                .reference()
                .and_then(|r| r.resolve(before))
                .map(|o| before.objects[o].cell.0),
            matches: query.matches(before),
            query,
        };
        if question.hard {
            let kind = query.reference().expect("hard questions refer").kind();
            let slot = hard.entry(kind).or_default();
            if question.in_scope {
                &mut slot.0
            } else {
                &mut slot.1
            }
            .push(question);
        } else {
            labelled.push(question);
        }
    }
    // Keep one in-scope and one out-of-scope hard question per query kind where both exist;
    // unmatched hard questions are dropped so the two sets stay balanced.
    for (_, (inside, outside)) in hard {
        if let (Some(i), Some(o)) = (inside.choose(rng), outside.choose(rng)) {
            labelled.push(i.clone());
            labelled.push(o.clone());
        }
    }
    labelled.shuffle(rng);
    labelled
}
