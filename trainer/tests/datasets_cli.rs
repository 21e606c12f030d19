//! The dataset options of `ma-trainer` (`--dataset NAME --root DIR`, repeated), through
//! the real binary: argument errors come before any work, and `info` reports what the
//! canonical-scale step does to real datasets.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shared(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/datasets")
        .join(name);
    assert!(
        root.is_dir(),
        "the {name} dataset is missing at {} (see shared/datasets/README.md); these tests \
         need it",
        root.display()
    );
    root
}

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ma-trainer"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn mismatched_dataset_and_root_counts_are_refused_before_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let ddb1 = shared("diaretdb1");
    let idrid = shared("idrid");
    let o = trainer(&[
        "train",
        "--dataset",
        "diaretdb1",
        "--dataset",
        "idrid",
        "--root",
        ddb1.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("2 --dataset and 1 --root"), "{e}");
    assert!(
        !out.exists(),
        "nothing is written before the arguments are checked"
    );

    // The same dataset twice.
    let o = trainer(&[
        "cv",
        "--dataset",
        "idrid",
        "--root",
        idrid.to_str().unwrap(),
        "--dataset",
        "idrid",
        "--root",
        idrid.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("given twice"), "{}", stderr(&o));

    // `train` on DiaretDB1 with bad options: each is refused with a message naming it.
    let train_with = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--root",
            ddb1.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = trainer(&args);
        assert!(!o.status.success(), "{extra:?} was accepted");
        stderr(&o)
    };
    // Augmentation effects without copies, copies without effects, a reversed range.
    let e = train_with(&["--aug-jpeg", "30,90"]);
    assert!(e.contains("need --camera-copies"), "{e}");
    let e = train_with(&["--camera-copies", "1"]);
    assert!(e.contains("at least one effect"), "{e}");
    let e = train_with(&["--camera-copies", "1", "--aug-jpeg", "90,30"]);
    assert!(e.contains("--aug-jpeg LO,HI"), "{e}");
    // Preprocessing settings from a folder without a manifest.
    let e = train_with(&["--preprocess-from", dir.path().to_str().unwrap()]);
    assert!(
        e.contains("--preprocess-from") && e.contains("manifest.toml"),
        "{e}"
    );
    assert!(!out.exists());
}

/// `info` on the two small external samples (5 ROC and 4 e-ophtha photos): the 768 px
/// ROC photos are enlarged 1.87x, e-ophtha shrunk 0.73x.
#[test]
fn info_reports_scale_and_ma_sizes_per_dataset() {
    let roc = shared("roc");
    let eophtha = shared("e_optha_MA");
    let o = trainer(&[
        "info",
        "--dataset",
        "roc",
        "--root",
        roc.to_str().unwrap(),
        "--dataset",
        "eophtha",
        "--root",
        eophtha.to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}\n{}", out, stderr(&o));
    assert!(out.contains("ROC: 5 images, 21 lesions"), "{out}");
    // The same with the shipped models' preprocessing settings: the scale step is the same.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    let o2 = trainer(&[
        "info",
        "--dataset",
        "roc",
        "--root",
        roc.to_str().unwrap(),
        "--preprocess-from",
        shipped.to_str().unwrap(),
    ]);
    let out2 = String::from_utf8_lossy(&o2.stdout);
    assert!(o2.status.success(), "{}\n{}", out2, stderr(&o2));
    assert!(
        out2.contains("scale to canonical (min / median / max): 1.000 / 1.873 / 1.875"),
        "{out2}"
    );
    assert!(out.contains("768x576"), "{out}");
    assert!(
        out.contains("scale to canonical (min / median / max): 1.000 / 1.873 / 1.875"),
        "{out}"
    );
    assert!(out.contains("e-ophtha-MA: 4 images, 7 lesions"), "{out}");
    assert!(
        out.contains("scale to canonical (min / median / max): 0.731 / 0.731 / 0.731"),
        "{out}"
    );
    assert!(out.contains("MA diameter, canonical px"), "{out}");
}

#[test]
fn info_paths_lists_every_photo_by_name_without_ground_truth_files() {
    // DiaretDB1 keeps its ground-truth maps under the photos' own file names: the listing
    // must hold the photos only, so a script can find a photo by name.
    let ddb1 = shared("diaretdb1");
    let o = trainer(&[
        "info",
        "--paths",
        "--dataset",
        "diaretdb1",
        "--root",
        ddb1.to_str().unwrap(),
        "--dataset",
        "roc",
        "--root",
        shared("roc").to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}\n{}", out, stderr(&o));
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(rows.len(), 28 + 5, "{out}");
    assert!(
        rows.iter()
            .all(|r| r.len() == 3 && Path::new(r[2]).is_file()),
        "{out}"
    );
    let image001: Vec<_> = rows.iter().filter(|r| r[1] == "image001.png").collect();
    assert_eq!(image001.len(), 1, "{out}");
    assert!(image001[0][2].contains("ddb1_fundusimages"), "{out}");
    assert_eq!(rows.iter().filter(|r| r[0] == "ROC").count(), 5, "{out}");
}
