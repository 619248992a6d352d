use burn::tensor::{Device, Tensor};
use mmke::data::pairs::{PairKind, ScopePair};
use mmke::train::scope::{ScopeRun, read_pairs};
use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let device = Device::flex();
    let mut run = ScopeRun::load(Path::new(&args[1]), &device).unwrap();
    let pairs = read_pairs(Path::new("/tmp/s/test.json"), Path::new("/tmp/s")).unwrap();
    let pairs: Vec<ScopePair> = pairs.into_iter().filter(|p| p.record < 60).collect();
    let batcher = run.batcher(&pairs).unwrap();
    let dim = run.config.model.dim;
    let tau = run
        .model
        .fusion
        .log_temperature
        .as_ref()
        .map(|t| t.val().exp().into_scalar::<f32>());
    println!("tau {tau:?}");
    for kind in [
        PairKind::Rephrase,
        PairKind::InScope,
        PairKind::HardInScope,
        PairKind::HardOutOfScope,
        PairKind::OutOfScope,
        PairKind::Near,
    ] {
        let sel: Vec<&ScopePair> = pairs.iter().filter(|p| p.kind == kind).collect();
        if sel.is_empty() {
            continue;
        }
        let z_e = run.model.encode(&batcher.edits(&sel, &device).unwrap());
        let z = run.model.encode(&batcher.queries(&sel, &device).unwrap());
        let d = (z_e - z).powi_scalar(2);
        let text: Tensor<1> = d.clone().narrow(1, 0, dim).sum_dim(1).mean().reshape([1]);
        let img: Tensor<1> = d.narrow(1, dim, dim).sum_dim(1).mean().reshape([1]);
        println!(
            "{kind:?} n={} text d2 {:.3} image d2 {:.3}",
            sel.len(),
            text.into_scalar::<f32>(),
            img.into_scalar::<f32>()
        );
    }
}
