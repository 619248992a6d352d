//! The base and counterfactual VLMs of an experiment train side by side on two threads; each
//! must come out exactly as it does when trained alone. Its own test binary: tests running in
//! parallel in one process share the device's generator, which would make the comparison
//! flaky.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use mmke::data::scenes::ScenesConfig;
use mmke::experiment::{VlmSpec, pretrained_clip, scenes_data, trained_vlms};
use mmke::train::clip::ClipTrainConfig;
use mmke::train::vlm::{Knowledge, VlmTrainConfig};

#[test]
fn vlms_trained_side_by_side_equal_those_trained_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let device = Device::flex().autodiff();
    let data = ScenesConfig {
        train: 6,
        test: 2,
        seed: 3,
        image_size: 32,
    };
    let data_dir = scenes_data(out, &data).unwrap();
    let clip = ClipTrainConfig {
        steps: 2,
        batch_size: 4,
        lr: 1e-3,
        seed: 0,
        scene_size: 32,
        checkpoint_every: 2,
        grounding_weight: 1.0,
        cells: Some(3),
        attribute_weight: 1.0,
        optim: Default::default(),
    };
    let clip_dir = pretrained_clip(out, "clip-tiny", 32, &clip, &device).unwrap();
    let train = |seed: u64| VlmTrainConfig {
        steps: 3,
        batch_size: 4,
        lr: 1e-3,
        text_every: 2,
        checkpoint_every: 3,
        seed,
        freeze_vision: false,
        optim: Default::default(),
        // With an -objects preset the referent readout's loss joins in; side by side must
        // still match.
        referent_weight: 1.0,
        edited_repeat: 0,
        rewrite_objects: false,
    };
    let (base, counterfactual) = (train(0), train(5));
    let side_by_side = out.join("side-by-side");
    trained_vlms(
        out,
        &side_by_side,
        None,
        &data,
        None,
        &data_dir,
        &clip_dir,
        32,
        VlmSpec {
            preset: "vlm-tiny-objects",
            train: &base,
        },
        VlmSpec {
            preset: "vlm-tiny-objects",
            train: &counterfactual,
        },
        &device,
    )
    .unwrap();
    for (name, knowledge, config) in [
        ("vlm", Knowledge::PreEdit, &base),
        ("counterfactual", Knowledge::Counterfactual, &counterfactual),
    ] {
        let alone = out.join("alone").join(name);
        mmke::train::vlm::run(
            knowledge,
            "vlm-tiny-objects",
            32,
            Some(&clip_dir),
            &data_dir,
            config,
            &alone,
            false,
            &device,
        )
        .unwrap();
        let values = |dir: &std::path::Path| {
            let (model, _, _) = mmke::model::vlm::load(dir, &Device::flex()).unwrap();
            let mut values = Values::default();
            model.visit(&mut values);
            values.0
        };
        let (a, b) = (values(&side_by_side.join(name)), values(&alone));
        assert!(a.len() > 100_000, "{name}: {} values", a.len());
        assert!(
            a == b,
            "{name}: trained side by side, it differs from the model trained alone"
        );
    }
}

/// Every float parameter value of a module, in visiting order.
#[derive(Default)]
struct Values(Vec<f32>);

impl ModuleVisitor for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let data = param.val().into_data().convert::<f32>();
        self.0.extend(data.iter::<f32>());
    }
}
