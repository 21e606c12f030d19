//! Preprocessing speed on a real 1500x1152 DiaretDB1 photograph.
//!
//! Run with `cargo bench -p ma-core --bench preprocess` (one thread: preprocessing is
//! sequential). The data must be at `../shared/datasets` beside the repository.

use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use ma_core::fov;
use ma_core::image_io;
use ma_core::preprocess::{FovSource, PreprocessConfig, preprocess};

fn sample_image() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/datasets/diaretdb1/resources/images/ddb1_fundusimages/image001.png");
    assert!(
        path.exists(),
        "benchmark image {} is missing: the shared datasets must sit beside the repository",
        path.display()
    );
    path
}

fn bench(c: &mut Criterion) {
    let path = sample_image();
    let bytes = std::fs::read(&path).expect("readable sample image");
    let img = image_io::decode_image(&bytes).expect("decodable sample image");
    assert_eq!(img.dimensions(), (1500, 1152));
    let cfg = PreprocessConfig::default();

    let mut group = c.benchmark_group("preprocess_1500x1152");
    group.sample_size(20);
    group.bench_function("decode_png", |b| {
        b.iter(|| image_io::decode_image(&bytes).unwrap())
    });
    group.bench_function("fov_estimate", |b| b.iter(|| fov::estimate(&img).unwrap()));
    group.bench_function("preprocess", |b| {
        b.iter(|| preprocess(&img, FovSource::Estimate, &cfg).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
