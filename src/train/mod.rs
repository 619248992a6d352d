//! Training loops, one per objective, sharing checkpointing.

pub mod checkpoint;
pub mod clip;
pub mod counterfactual;
pub mod knowledge;
pub mod meta;
pub mod scope;
pub mod vlm;

/// Held by a training from seeding the device's generator until every parameter of its model
/// has its initial values, so that trainings on parallel threads draw exactly what each draws
/// alone.
static INITIALISING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Waits for (and then holds) the right to draw initial values from the device's generator,
/// and seeds it with `seed`: the one place mmke seeds a device, at the start of a training run
/// from the seed its configuration passes in (nothing else reseeds a device).
pub(crate) fn seeded(
    device: &burn::tensor::Device,
    seed: u64,
) -> std::sync::MutexGuard<'static, ()> {
    let guard = INITIALISING.lock().unwrap_or_else(|e| e.into_inner());
    device.seed(seed);
    if let Some(host) = flex_host(device) {
        host.seed(seed);
    }
    guard
}

/// The flex device parameters draw their initial values on when training runs on another
/// backend (`None` on flex itself, or in a binary built without flex): every backend has a
/// generator of its own, so one seed would otherwise start a different model on each.
fn flex_host(device: &burn::tensor::Device) -> Option<burn::tensor::Device> {
    #[cfg(feature = "flex")]
    {
        let flex = burn::tensor::Device::flex();
        if device.clone().without_autodiff() == flex {
            return None;
        }
        Some(if device.is_autodiff() {
            flex.autodiff()
        } else {
            flex
        })
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        None
    }
}

/// The device a model is built on for training on `device`: flex when `device` is another
/// backend (see [`draw_as_on_flex`]; a constructor that draws values at once, such as an
/// identity-initialised layer's discarded bias, then draws them from flex's generator, as on
/// flex), else `device` itself.
pub(crate) fn init_device(device: &burn::tensor::Device) -> burn::tensor::Device {
    flex_host(device).unwrap_or_else(|| device.clone())
}

/// Draws every initial value of `model` that it has not drawn yet, as training on flex draws
/// it, on any `device`: `first_forward` (the first step's forward pass) draws the parameters
/// it uses, in the order it uses them, then the rest draw ([`Materialise`]). On another
/// backend this happens on flex (seeded by [`seeded`]) and the model then moves to `device`:
/// every backend has a generator of its own, so one seed would otherwise start a different
/// model on each. Call it once the device is seeded, before anything else reads a parameter.
pub(crate) fn draw_as_on_flex<M: burn::module::Module>(
    model: M,
    device: &burn::tensor::Device,
    first_forward: impl FnOnce(&M, &burn::tensor::Device) -> crate::Result<()>,
) -> crate::Result<M> {
    let Some(host) = flex_host(device) else {
        first_forward(&model, device)?;
        model.visit(&mut Materialise);
        return Ok(model);
    };
    let model = model.fork(&host);
    first_forward(&model, &host)?;
    model.visit(&mut Materialise);
    Ok(model.fork(device))
}

/// Makes every parameter hold its values (Burn draws a parameter's initial values lazily, at
/// its first use).
pub(crate) struct Materialise;

impl burn::module::ModuleVisitor for Materialise {
    fn visit_float<const D: usize>(
        &mut self,
        param: &burn::module::Param<burn::tensor::Tensor<D>>,
    ) {
        param.val();
    }
}

/// Every live progress bar: training loops on parallel threads stack their bars here.
static PROGRESS: std::sync::LazyLock<indicatif::MultiProgress> =
    std::sync::LazyLock::new(indicatif::MultiProgress::new);

/// The progress display of a training loop: `steps` in all, `done` already.
pub fn progress_bar(steps: usize, done: usize) -> indicatif::ProgressBar {
    let bar = PROGRESS.add(indicatif::ProgressBar::new(steps as u64).with_position(done as u64));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}")
            .expect("a valid template"),
    );
    bar
}

/// The optimiser and learning-rate schedule of a training loop. The default is Adam at a
/// constant rate (Burn's defaults), what every loop used before these knobs existed.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// AdamW's decoupled weight decay; 0 is plain Adam.
    pub weight_decay: f64,
    /// Steps of linear warm-up from `lr / warmup` to the peak rate.
    pub warmup: usize,
    /// Cosine decay from the peak after warm-up to `min_lr_ratio * lr` at the last step.
    pub cosine: bool,
    pub min_lr_ratio: f64,
    /// Clip each parameter's gradient to this L2 norm.
    pub clip_norm: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            weight_decay: 0.0,
            warmup: 0,
            cosine: false,
            min_lr_ratio: 0.0,
            clip_norm: None,
        }
    }
}

impl OptimConfig {
    pub fn init(&self) -> burn::optim::ModuleOptimizer {
        let clipping = self
            .clip_norm
            .map(|n| burn::grad_clipping::GradientClippingConfig::Norm(n as f32));
        if self.weight_decay == 0.0 {
            burn::optim::AdamConfig::new()
                .with_grad_clipping(clipping)
                .init()
        } else {
            burn::optim::AdamWConfig::new()
                .with_weight_decay(self.weight_decay as f32)
                .with_grad_clipping(clipping)
                .init()
        }
    }

    /// The learning rate of step `step` (0-based) of `steps`, peak `lr`: linear warm-up, then
    /// constant or cosine decay.
    pub fn lr(&self, lr: f64, step: usize, steps: usize) -> f64 {
        if step < self.warmup {
            return lr * (step + 1) as f64 / self.warmup as f64;
        }
        if !self.cosine {
            return lr;
        }
        let span = steps.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let floor = self.min_lr_ratio * lr;
        floor + (lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::OptimConfig;

    #[test]
    fn the_schedule_warms_up_linearly_then_decays_by_a_cosine() {
        let config = OptimConfig {
            warmup: 10,
            cosine: true,
            min_lr_ratio: 0.1,
            ..OptimConfig::default()
        };
        assert!((config.lr(1.0, 0, 110) - 0.1).abs() < 1e-12);
        assert!((config.lr(1.0, 9, 110) - 1.0).abs() < 1e-12);
        assert!((config.lr(1.0, 10, 110) - 1.0).abs() < 1e-12);
        // Half-way through the decay: the mean of the peak and the floor.
        assert!((config.lr(1.0, 60, 110) - 0.55).abs() < 1e-12);
        assert!(config.lr(1.0, 109, 110) > 0.1 && config.lr(1.0, 109, 110) < 0.11);
        assert_eq!(OptimConfig::default().lr(0.5, 7, 10), 0.5);
    }
}
