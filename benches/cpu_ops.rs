//! CPU benchmarks (criterion): VGG16 224² forward at batch 1 and 8, and single ops.
//! `cargo bench --bench cpu_ops`. Compare with `benches/pytorch_cpu_forward.py` on the same machine.

use criterion::{criterion_group, criterion_main, Criterion};
use scorecam_gpu::backend::cpu;
use scorecam_gpu::backend::Semantics;
use scorecam_gpu::model::Vgg;

fn forward(c: &mut Criterion) {
    let model = Vgg::random_vgg16(0);
    let mut g = c.benchmark_group("vgg16_forward_224");
    g.sample_size(10);
    for n in [1usize, 8] {
        let x = vec![0.1f32; n * 3 * 224 * 224];
        g.bench_function(format!("batch{n}"), |b| {
            b.iter(|| cpu::forward(&model, &x, n, 224, None))
        });
    }
    g.finish();
}

fn ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("ops");
    g.sample_size(10);
    // conv4_2-like layer: 512→512 at 28×28.
    let (cin, cout, h) = (512, 512, 28);
    let x = vec![0.1f32; cin * h * h];
    let w = vec![0.01f32; cout * cin * 9];
    let bias = vec![0.0f32; cout];
    g.bench_function("conv3x3_512x28x28", |b| {
        b.iter(|| cpu::conv3x3(&x, 1, cin, h, h, &w, &bias, cout))
    });
    let a: Vec<f32> = (0..14 * 14).map(|i| (i % 17) as f32).collect();
    g.bench_function("channel_mask_14_to_224", |b| {
        b.iter(|| cpu::channel_mask(&a, 14, 14, 224, Semantics::Official))
    });
    g.finish();
}

criterion_group!(benches, forward, ops);
criterion_main!(benches);
