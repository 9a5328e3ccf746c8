//! The model's kernel catalog: every kernel assembles with ptxas for sm_80
//! and sm_90 (no errors, no warnings; registers, spills and shared memory
//! are printed and written to a report), and the generated PTX matches the
//! committed snapshot, so a change to generated code shows up in review.
//! Refresh the snapshot with `QVC_BLESS=1 cargo test -p qvc-kernels --test catalog`.

use std::fmt::Write as _;
use std::path::Path;

use qvc_codegen::{ptxas, Module, Target};
use qvc_kernels::gpu::catalog::{fingerprint, model_kernels};

fn snapshot() -> String {
    let mut s = String::from("# family kernel ptx-fnv64 instructions shared-bytes grid block flops bytes\n");
    for e in model_kernels() {
        let k = e.spec.build();
        assert_eq!(k.name, e.spec.name(), "a spec's kernel must carry the spec's name");
        let text = Module::new(Target::Sm80, vec![k.clone()]).print();
        let l = e.spec.launch();
        let c = e.spec.cost();
        writeln!(
            s,
            "{} {} {:016x} {} {} {:?} {:?} {} {}",
            e.family,
            k.name,
            fingerprint(&text),
            k.instr_count(),
            k.shared_bytes(),
            l.grid,
            l.block,
            c.flops,
            c.bytes
        )
        .unwrap();
    }
    s
}

#[test]
fn generated_ptx_matches_the_snapshot() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots/model-kernels.txt");
    let now = snapshot();
    if std::env::var("QVC_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &now).unwrap();
        return;
    }
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    if old != now {
        let old_lines: std::collections::HashSet<&str> = old.lines().collect();
        let new_lines: std::collections::HashSet<&str> = now.lines().collect();
        let mut diff = String::new();
        for l in old.lines().filter(|l| !new_lines.contains(l)) {
            writeln!(diff, "- {l}").unwrap();
        }
        for l in now.lines().filter(|l| !old_lines.contains(l)) {
            writeln!(diff, "+ {l}").unwrap();
        }
        panic!(
            "generated PTX differs from {}:\n{diff}\nIf the change is intended, run \
             `QVC_BLESS=1 cargo test --release -p qvc-kernels --test catalog` and commit the snapshot.",
            path.display()
        );
    }
}

#[test]
fn catalog_names_are_unique_and_launches_fit_the_hardware() {
    let all = model_kernels();
    assert!(all.len() > 40, "catalog has only {} kernels", all.len());
    for e in &all {
        let l = e.spec.launch();
        let threads = l.threads_per_block();
        assert!(threads > 0 && threads <= 1024 && threads % 32 == 0, "{}: block {:?}", e.spec.name(), l.block);
        assert!(l.grid.iter().all(|&g| g > 0) && l.grid[1] < 65536 && l.grid[2] < 65536, "{}", e.spec.name());
        let k = e.spec.build();
        assert!(k.shared_bytes() <= 48 * 1024, "{}: {} bytes of static shared memory", k.name, k.shared_bytes());
        if let Some(max) = k.max_threads {
            assert!(threads <= max, "{}: launched with {threads} threads, .maxntid {max}", k.name);
        }
        let c = e.spec.cost();
        assert!(c.bytes > 0, "{}: a kernel moves bytes", k.name);
    }
}

#[test]
fn every_model_kernel_assembles_for_sm80_and_sm90() {
    let Some(ptxas) = ptxas::for_tests() else {
        eprintln!("SKIPPED: ptxas not found (scripts/install-ptxas.sh installs it)");
        return;
    };
    let entries = model_kernels();
    let kernels: Vec<_> = entries.iter().map(|e| e.spec.build()).collect();
    let mut report = String::from(
        "| family | kernel | target | registers | spill st/ld (B) | shared (B) |\n|---|---|---|---|---|---|\n",
    );
    for t in Target::ALL {
        let text = Module::new(t, kernels.clone()).print();
        let usage = ptxas::assemble(&ptxas, &text, t).unwrap_or_else(|e| panic!("{e}"));
        for (e, k) in entries.iter().zip(&kernels) {
            let u =
                usage.iter().find(|u| u.name == k.name).unwrap_or_else(|| panic!("ptxas did not report {}", k.name));
            assert_eq!(u.shared_bytes, k.shared_bytes(), "{}: shared memory", k.name);
            writeln!(
                report,
                "| {} | {} | {} | {} | {}/{} | {} |",
                e.family,
                k.name,
                t.name(),
                u.registers,
                u.spill_stores,
                u.spill_loads,
                u.shared_bytes
            )
            .unwrap();
        }
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ptxas-model-kernels.md");
    std::fs::write(&out, &report).unwrap();
    println!("{report}\n(written to {})", out.display());
}
