//! `ma-trainer` command line. Kept thin: each subcommand parses its arguments and calls the
//! library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use ma_device::preprocess::PreprocessConfig;

use ma_device::manifest::{Training, Variant};
use ma_device::signing::{self, KeyPair, SecretKey};
use ma_trainer::cv::{
    CvSummary, ScoreSource, WeightSweep, cross_validate, evaluate_fold, summarise,
    sweep_stage1_weight,
};
use ma_trainer::datasets::{Dataset, LoadOptions};
use ma_trainer::datasets::{DatasetKind, Split};
use ma_trainer::eval::{self, EvalOptions};
use ma_trainer::export::export_model_set;
use ma_trainer::nets::Stage;
use ma_trainer::pipeline::{Cascade, PipelineConfig, train_cascade};
use ma_trainer::prepare::{PreparedImage, prepare_all};
use ma_trainer::train::load_net;

#[derive(Parser)]
#[command(
    name = "ma-trainer",
    version,
    about = "Microaneurysm detector: training, dataset readers and FROC evaluation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score a `ma-device detect` output file against a dataset's ground truth (lesion-level
    /// FROC, CPM and image-level AUC).
    #[command(
        long_about = "Score a `ma-device detect` output file against a dataset's ground \
        truth.\n\nA detection within 5 px of a lesion (or inside it) finds that lesion; each \
        lesion counts once, with its best score. DiaretDB1 'uncertain' pixels are ignored; \
        every other detection, and any outside the image, is a false positive. Reports the \
        sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per image, their mean \
        (CPM), the image-level AUC and operating score thresholds.\n\nDetection lines are \
        matched to dataset images by file name. Every image of the dataset (or split) needs \
        one successful line; lines for other images are ignored and counted."
    )]
    Eval(EvalArgs),
    /// Train both stages of the cascade on a dataset (all images of the split).
    ///
    /// Stage 1 (a small fully-convolutional net, output stride 2) learns from 128x128
    /// crops whose every output cell is labelled, drawn afresh every epoch; its candidates
    /// on the training images are stage 2's hard negatives (and, where they hit lesions,
    /// positives). Stage 2 (the papers' final CNN with batch norm, 41x41 patches) learns
    /// to tell them apart. Checkpoints are written every epoch to OUT/checkpoints; the
    /// trained weights to OUT/stage1.safetensors and OUT/stage2.safetensors. Runs on CUDA
    /// when available, else CPU.
    Train(TrainArgs),
    /// K-fold cross-validation: train on K-1 folds, score the held-out fold with the
    /// lesion-level FROC rules, for every fold; prints per-fold and mean CPM and the
    /// recall of stage-1 candidates against candidates per image.
    Cv {
        #[command(flatten)]
        train: TrainArgs,
        /// Number of folds (image i, in name order, is in fold i mod K).
        #[arg(long, default_value_t = 4)]
        folds: usize,
        /// Run only this fold (1-based), e.g. to spread a long CV over several sessions.
        #[arg(long)]
        fold: Option<usize>,
    },
    /// Diagnose one trained fold: CPM of its held-out images when candidates are scored
    /// by stage 1 only, stage 2 only, or both, and the stage-1 candidate recall.
    FoldEval {
        #[command(flatten)]
        train: TrainArgs,
        #[arg(long, default_value_t = 4)]
        folds: usize,
        /// The fold (1-based).
        #[arg(long)]
        fold: usize,
        /// Stage-1 weights (safetensors), e.g. CV_OUT/fold-K/stage1.safetensors.
        #[arg(long)]
        weights1: PathBuf,
        /// Stage-2 weights (safetensors), e.g. CV_OUT/fold-K/stage2.safetensors.
        #[arg(long)]
        weights2: PathBuf,
    },
    /// Compare stage-1 weights in the score on a finished CV: runs every fold's trained
    /// nets (OUT/fold-K, from `cv --out OUT`) once on its held-out images and prints the
    /// per-fold, mean and pooled CPM of `sigmoid((m2 + w m1) / T)` for each weight w.
    /// Writes OUT/stage1-weight-sweep.json. Nothing is retrained; only the score changes.
    ScoreSweep {
        /// The `cv` settings (--root, --out = the CV folder, ...).
        #[command(flatten)]
        train: TrainArgs,
        #[arg(long, default_value_t = 4)]
        folds: usize,
        /// Stage-1 weights to compare, comma-separated (0 = stage 2 alone).
        #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1,1.5,2")]
        stage1_weights: Vec<f64>,
    },
    /// Write the trained networks as ONNX (float and int8-weight variants) with a
    /// manifest (sha256 of every file, preprocessing, candidate settings, operating
    /// points and CV figures from `cv`) into a models folder.
    Export {
        /// Folder of `ma-trainer train` (stage1.safetensors, stage2.safetensors).
        #[arg(long)]
        weights: PathBuf,
        /// Folder of `ma-trainer cv` (cv-summary.json: operating points and CV CPM).
        #[arg(long)]
        cv: PathBuf,
        /// Where to write the models and manifest.toml.
        #[arg(long, default_value = "models")]
        out: PathBuf,
        /// Release name written into the manifest (shown in records and on screen).
        #[arg(long)]
        version: String,
        /// Variant the device loads by default.
        #[arg(long, default_value = "float")]
        default_variant: Variant,
        /// Sign the bundle with this secret key (from `ma-trainer keygen`): writes
        /// manifest.toml.sig. Devices whose board config names the matching public key
        /// (inference.public_key) refuse bundles that are unsigned or signed otherwise.
        #[arg(long, value_name = "KEY")]
        sign: Option<PathBuf>,
    },
    /// Make an ed25519 key pair for signing model bundles: <OUT>.key and <OUT>.pub.
    ///
    /// The .key file (mode 0600) signs bundles with `export --sign`; keep it off the
    /// devices and out of version control. The .pub file goes on each device (the board
    /// config's inference.public_key) and may be published. Existing files are never
    /// overwritten.
    Keygen {
        /// Path of the pair without extension.
        #[arg(long, default_value = "keys/models")]
        out: PathBuf,
    },
    /// Sign an existing model bundle (writes manifest.toml.sig) after checking that every
    /// file the manifest lists is present with its SHA-256: a broken bundle is never
    /// signed.
    Sign {
        /// Folder with manifest.toml and the ONNX files.
        #[arg(long, default_value = "models")]
        models: PathBuf,
        /// Secret key from `ma-trainer keygen`.
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
    },
    /// Show the libtorch device training would use, CUDA availability and torch threads.
    Info,
}

#[derive(Args)]
struct EvalArgs {
    /// Which dataset reader to use for --root.
    #[arg(long, value_enum)]
    dataset: DatasetKind,
    /// Dataset root folder, laid out as its publisher ships it (e.g.
    /// ../shared/datasets/diaretdb1).
    #[arg(long)]
    root: PathBuf,
    /// DiaretDB1 only: score this published split; omit for every image the dataset has.
    #[arg(long, value_enum)]
    split: Option<Split>,
    /// JSONL file written by `ma-device detect` (one line per image, every candidate with
    /// its score).
    #[arg(long)]
    detections: PathBuf,
    /// DiaretDB1 only: a pixel belongs to an MA when its fused expert confidence
    /// (value/252) is at least this; pixels with lower non-zero confidence are uncertain and
    /// ignored.
    #[arg(long, default_value_t = 0.5)]
    threshold: f64,
    /// Also write the FROC curve to this PNG file.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
    /// Also print a table of counts per image.
    #[arg(long)]
    per_image: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// Which dataset reader to use for --root.
    #[arg(long, value_enum, default_value = "diaretdb1")]
    dataset: DatasetKind,
    /// Dataset root folder (e.g. ../shared/datasets/diaretdb1).
    #[arg(long)]
    root: PathBuf,
    /// DiaretDB1 only: the published split to train on.
    #[arg(long, value_enum, default_value = "train")]
    split: Split,
    /// DiaretDB1 only: fused-confidence threshold that makes a pixel part of an MA.
    #[arg(long, default_value_t = 0.5)]
    threshold: f64,
    /// Output folder for checkpoints, weights and reports.
    #[arg(long)]
    out: PathBuf,
    /// Epochs of stage 1.
    #[arg(long, default_value_t = 15)]
    epochs1: usize,
    /// Stage-1 crops (128x128, every stride-2 cell labelled) per epoch; half hold a lesion.
    #[arg(long, default_value_t = 3000)]
    crops1: usize,
    /// Stage-1 peak learning rate (AdamW, one-cycle schedule).
    #[arg(long, default_value_t = 2e-3)]
    lr1: f64,
    /// Epochs of stage 2.
    #[arg(long, default_value_t = 12)]
    epochs2: usize,
    /// Stage-2 peak learning rate (AdamW, one-cycle schedule).
    #[arg(long, default_value_t = 2e-3)]
    lr2: f64,
    /// Seed of everything random (sampling, augmentation, initialisation, dropout).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Continue from the last checkpoint in OUT instead of starting over. On a finished
    /// run nothing is trained: `cv --resume` then only re-scores the held-out images with
    /// the current scoring rule and rewrites cv-summary.json (about 40 s per fold).
    #[arg(long)]
    resume: bool,
}

impl TrainArgs {
    fn pipeline(&self) -> PipelineConfig {
        let mut cfg = PipelineConfig::default();
        cfg.stage1.epochs = self.epochs1;
        cfg.stage1.learning_rate = self.lr1;
        cfg.stage1.seed = self.seed;
        cfg.stage1_crops = self.crops1;
        cfg.stage2.epochs = self.epochs2;
        cfg.stage2.learning_rate = self.lr2;
        cfg.stage2.seed = self.seed + 1;
        cfg
    }

    fn prepare(&self) -> Result<Vec<PreparedImage>> {
        let split = (self.dataset == DatasetKind::Diaretdb1).then_some(self.split);
        let opts = LoadOptions {
            split,
            confidence_threshold: self.threshold,
        };
        let dataset = Dataset::load(self.dataset, &self.root, &opts)?;
        if dataset.images.iter().any(|i| !i.has_truth()) {
            anyhow::bail!(
                "training needs ground truth: the {} dataset at {} has none",
                self.dataset,
                self.root.display()
            );
        }
        prepare_all(&dataset.images, &PreprocessConfig::default())
    }
}

fn train(a: &TrainArgs) -> Result<()> {
    let started = Instant::now();
    let images = a.prepare()?;
    let all: Vec<usize> = (0..images.len()).collect();
    let cascade = train_cascade(&images, &all, &[], &a.pipeline(), &a.out, a.resume)?;
    for (stage, (vs, _)) in [("stage1", &cascade.stage1), ("stage2", &cascade.stage2)] {
        let path = a.out.join(format!("{stage}.safetensors"));
        vs.save(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("{stage} weights: {}", path.display());
    }
    println!(
        "trained on {} images in {:.1} min",
        images.len(),
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

fn cv(a: &TrainArgs, folds: usize, fold: Option<usize>) -> Result<()> {
    let started = Instant::now();
    let images = a.prepare()?;
    if fold == Some(0) {
        anyhow::bail!("--fold counts from 1");
    }
    let results = cross_validate(
        &images,
        folds,
        fold.map(|f| f - 1),
        &a.pipeline(),
        &a.out,
        a.resume,
    )?;
    println!("fold  images  lesions  CPM    recall@50  recall@100  recall@150  minutes");
    for r in &results {
        let at = |k| {
            r.recall
                .iter()
                .find(|(kk, _)| *kk == k)
                .map_or(f64::NAN, |(_, v)| *v)
        };
        println!(
            "{:>4}  {:>6}  {:>7}  {:.3}  {:>9.3}  {:>10.3}  {:>10.3}  {:>7.1}",
            r.fold + 1,
            r.report.images,
            r.report.lesions,
            r.report.cpm,
            at(50),
            at(100),
            at(150),
            r.seconds / 60.0
        );
    }
    let mean = results.iter().map(|r| r.report.cpm).sum::<f64>() / results.len() as f64;
    println!(
        "mean CPM over the {} fold(s) of this run: {mean:.3}",
        results.len()
    );
    if let Some(s) = summarise(&images, folds, &a.out)? {
        println!(
            "all folds run so far in {} ({:?} of {}): mean CPM {:.3}, pooled CPM {:.3}; operating points (score at 1/2/4 FP per image) {:.3}/{:.3}/{:.3}; written to {}",
            a.out.display(),
            s.folds_run,
            s.folds,
            s.mean_cpm,
            s.pooled_cpm,
            s.operating_points[0],
            s.operating_points[1],
            s.operating_points[2],
            a.out.join(CvSummary::FILE_NAME).display()
        );
    }
    println!(
        "held-out detections are in {} (score with `ma-trainer eval`)",
        a.out.display()
    );
    println!("total {:.1} min", started.elapsed().as_secs_f64() / 60.0);
    Ok(())
}

fn fold_eval(a: &TrainArgs, folds: usize, fold: usize, s1: &Path, s2: &Path) -> Result<()> {
    if fold == 0 || fold > folds {
        anyhow::bail!("--fold must be between 1 and --folds ({folds}), got {fold}");
    }
    let images = a.prepare()?;
    let cascade = Cascade {
        stage1: load_net(s1, Stage::Candidates)?,
        stage2: load_net(s2, Stage::Verdict)?,
    };
    let (reports, recall) = evaluate_fold(&images, folds, fold - 1, &cascade, &a.pipeline())?;
    for (scoring, r) in ScoreSource::ALL.iter().zip(&reports) {
        println!(
            "fold {fold}: CPM {:.3} scoring by {}",
            r.cpm,
            scoring.name()
        );
    }
    println!(
        "candidate recall: {}",
        recall
            .iter()
            .map(|(k, r)| format!("@{k} {r:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

fn score_sweep(a: &TrainArgs, folds: usize, weights: &[f64]) -> Result<()> {
    let images = a.prepare()?;
    let cfg = a.pipeline();
    let sweep = sweep_stage1_weight(&images, folds, &a.out, weights, &cfg)?;
    let folds_head: String = sweep
        .folds_run
        .iter()
        .map(|f| format!("  fold {f}"))
        .collect();
    println!("stage-1 weight{folds_head}   mean  pooled");
    for r in &sweep.rows {
        let per: String = r
            .cpm_per_fold
            .iter()
            .map(|c| format!("  {c:6.3}"))
            .collect();
        let shipped = if r.stage1_weight == cfg.scoring.stage1_weight {
            "  (current default)"
        } else {
            ""
        };
        println!(
            "{:>14}{per}  {:.3}  {:.3}{shipped}",
            r.stage1_weight, r.mean_cpm, r.pooled_cpm
        );
    }
    let path = a.out.join(WeightSweep::FILE_NAME);
    std::fs::write(&path, serde_json::to_string_pretty(&sweep)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("written to {}", path.display());
    Ok(())
}

fn export(
    weights: &Path,
    cv: &Path,
    out: &Path,
    version: &str,
    default_variant: Variant,
    sign: Option<&Path>,
) -> Result<()> {
    // Read the key first: a wrong path must not cost a finished export.
    let secret = sign
        .map(|k| SecretKey::read(k).context("export --sign"))
        .transpose()?;
    let summary = CvSummary::load(cv)?;
    let (vs1, _) = load_net(&weights.join("stage1.safetensors"), Stage::Candidates)?;
    let (vs2, _) = load_net(&weights.join("stage2.safetensors"), Stage::Verdict)?;
    let training = Training {
        data: "DiaretDB1 v1.1 training split (28 images), redsmalldots >= 0.5".to_string(),
        images: 28,
        licence: "research use only (trained on research-use datasets)".to_string(),
        cv_cpm: summary.mean_cpm,
    };
    let manifest = export_model_set(
        &vs1,
        &vs2,
        out,
        version,
        default_variant,
        summary.operating_points,
        training,
    )?;
    for m in &manifest.models {
        println!("wrote {}", out.join(&m.file).display());
    }
    println!(
        "wrote {} (CV CPM {:.3} over folds {:?})",
        out.join(ma_device::manifest::FILE_NAME).display(),
        summary.mean_cpm,
        summary.folds_run
    );
    match &secret {
        Some(key) => println!(
            "wrote {} (signed by key {})",
            signing::sign_manifest(out, key)?.display(),
            key.public().fingerprint()
        ),
        None => println!(
            "not signed: devices whose board config sets inference.public_key will refuse \
             this bundle (sign with --sign KEY)"
        ),
    }
    Ok(())
}

fn sign(models: &Path, key: &Path) -> Result<()> {
    let secret = SecretKey::read(key).context("sign --key")?;
    let manifest = ma_device::manifest::Manifest::load(models)?;
    for entry in &manifest.models {
        manifest.verify_file(entry)?;
    }
    let sig = signing::sign_manifest(models, &secret)?;
    println!(
        "wrote {} (manifest {} with {} files, signed by key {})",
        sig.display(),
        manifest.version,
        manifest.models.len(),
        secret.public().fingerprint()
    );
    Ok(())
}

fn keygen(out: &Path) -> Result<()> {
    let pair = KeyPair::generate()?;
    let (secret, public) = pair.write(out)?;
    println!(
        "wrote {} (SECRET: keep it off devices and out of version control)",
        secret.display()
    );
    println!(
        "wrote {} (key {}: set inference.public_key to it in the board configs)",
        public.display(),
        pair.secret.public().fingerprint()
    );
    Ok(())
}

fn info() {
    let device = tch::Device::cuda_if_available();
    println!("training device: {device:?}");
    println!("CUDA available: {}", tch::Cuda::is_available());
    println!("CUDA devices: {}", tch::Cuda::device_count());
    println!("cuDNN available: {}", tch::Cuda::cudnn_is_available());
    println!("torch threads: {}", tch::get_num_threads());
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Eval(a) => {
            let opts = EvalOptions {
                kind: a.dataset,
                root: a.root,
                split: a.split,
                detections: a.detections,
                confidence_threshold: a.threshold,
                progress: true,
            };
            eval::run(&opts, a.plot.as_deref(), a.per_image)
        }
        Command::Train(a) => train(&a),
        Command::Cv { train, folds, fold } => cv(&train, folds, fold),
        Command::FoldEval {
            train,
            folds,
            fold,
            weights1,
            weights2,
        } => fold_eval(&train, folds, fold, &weights1, &weights2),
        Command::ScoreSweep {
            train,
            folds,
            stage1_weights,
        } => score_sweep(&train, folds, &stage1_weights),
        Command::Export {
            weights,
            cv,
            out,
            version,
            default_variant,
            sign,
        } => export(
            &weights,
            &cv,
            &out,
            &version,
            default_variant,
            sign.as_deref(),
        ),
        Command::Keygen { out } => keygen(&out),
        Command::Sign { models, key } => sign(&models, &key),
        Command::Info => {
            info();
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ma-trainer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
