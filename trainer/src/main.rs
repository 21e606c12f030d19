//! `ma-trainer` command line. Kept thin: each subcommand parses its arguments and calls the
//! library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use ma_core::preprocess::PreprocessConfig;

use ma_core::manifest::{Role, Training, Variant};
use ma_core::signing::{self, KeyPair, SecretKey};
use ma_trainer::camera_aug::CameraAugment;
use ma_trainer::cv::{
    CvSummary, ScoreSource, WeightSweep, cross_validate, evaluate_fold, fold_assignment, summarise,
    sweep_stage1_weight,
};
use ma_trainer::dataset_stats::dataset_stats;
use ma_trainer::datasets::{Dataset, LoadOptions};
use ma_trainer::datasets::{DatasetKind, Split};
use ma_trainer::eval::{self, EvalOptions};
use ma_trainer::export::{Release, export_model_set, weights, write_unsigned};
use ma_trainer::nets::{InputScales, Stage};
use ma_trainer::pipeline::{Cascade, PipelineConfig, train_cascade};
use ma_trainer::prepare::{PreparedImage, prepare_all};
use ma_trainer::referral::ReferralTraining;
use ma_trainer::referral_run::{self, ReferralData};
use ma_trainer::train::{Triplet, load_net};
use ma_trainer::training_data::{DeviceSettings, TrainingData};
use ma_trainer::validate;
use ma_trainer::zoom::ZoomSettings;

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
    /// Train both stages of the cascade on one or more datasets (all images of the split).
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
    /// Attach to a released model set the training weights its networks were exported
    /// from (its reference weights, which `validate` runs with libtorch): each file must
    /// export to the set's float ONNX file of its network byte for byte, or nothing is
    /// changed. Copies them beside the models as <role>.safetensors, lists their SHA-256
    /// in the manifest ([[reference_weights]]) under the new release name, and signs it
    /// again with --sign. `export` and `referral export` attach them themselves.
    AttachWeights {
        /// The model set (manifest.toml and its ONNX files).
        #[arg(long, default_value = "models")]
        models: PathBuf,
        /// Stage-1 weights (`train`'s OUT/stage1.safetensors).
        #[arg(long)]
        stage1: Option<PathBuf>,
        /// Stage-2 weights (`train`'s OUT/stage2.safetensors).
        #[arg(long)]
        stage2: Option<PathBuf>,
        /// Referral network weights (`referral train`'s OUT/referral.safetensors).
        #[arg(long)]
        referral: Option<PathBuf>,
        /// Crop classifier weights (`referral zoom-train`'s OUT/zoom.safetensors).
        #[arg(long)]
        zoom: Option<PathBuf>,
        /// New release name for the manifest (the manifest changes, so devices and
        /// records must tell it from the old one).
        #[arg(long)]
        version: String,
        /// Sign the changed manifest with this secret key.
        #[arg(long, value_name = "KEY")]
        sign: Option<PathBuf>,
    },
    /// Field validation: re-run a device's bundle (`ma-device records export --bundle`)
    /// on the workstation and report how well they agree.
    ///
    /// Checks the bundle (complete, every file's SHA-256, the model manifest's signature
    /// with --public-key) and that --models is the model set the device ran (else says
    /// what differs), then runs every frame through the reference cascade: the device's
    /// pipeline with the networks in libtorch, float, from the set's reference weights.
    /// Writes OUT/part-K-of-N.jsonl (one line per frame, resumable) and, for the whole
    /// bundle (no --shard, or after `validate-merge`), OUT/report.html (self-contained,
    /// Bland-Altman plots embedded), OUT/report.json and OUT/frames.csv (one line per
    /// frame): per frame the refer decisions, MAs matched within 2 px and score
    /// differences; overall Cohen's kappa and the confusion matrix of refer decisions,
    /// the MA match rate, the largest and mean score differences, the frames that
    /// disagree; with --truth, the sensitivity at 1/8..8 FP/image and CPM of device and
    /// workstation side by side. Exit code 2 when an
    /// agreement limit (--min-kappa, --max-score-diff) is not met, 1 on errors.
    ///
    /// Large bundles: run `--shard K/N` for K = 1..N on N machines (e.g. a Slurm array
    /// job with K = $SLURM_ARRAY_TASK_ID, or a Kubernetes Indexed Job with K =
    /// $JOB_COMPLETION_INDEX + 1), each writing its part into a shared OUT, then
    /// `validate-merge` once.
    #[command(verbatim_doc_comment)]
    Validate {
        #[command(flatten)]
        args: ValidateArgs,
        /// Compare only records K-1, K-1+N, ... of the bundle (K of N machines).
        #[arg(long, value_name = "K/N", default_value = "1/1")]
        shard: ma_trainer::validate::Shard,
    },
    /// Join the parts of a sharded `validate` (every shard once) into OUT/report.html and
    /// OUT/report.json; exit code 2 when an agreement limit is not met.
    ValidateMerge {
        #[command(flatten)]
        args: ValidateArgs,
        /// The parts (part-K-of-N.jsonl); default: every part in OUT.
        parts: Vec<PathBuf>,
    },
    /// Make an ed25519 key pair for signing model bundles: <OUT>.key and <OUT>.pub.
    ///
    /// The .key file (mode 0600) signs bundles with `export --sign`; keep it off the
    /// devices and out of version control. The .pub file goes on each device (the board
    /// config's inference.public_key) and may be published. Existing files are never
    /// overwritten.
    Keygen {
        /// Path of the pair without extension: writes OUT.key and OUT.pub (appended, so
        /// `release-0.4` gives `release-0.4.key`).
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
    /// The image-level referral network (refer the eye or not, moderate DR or worse),
    /// trained on the graded photos: `referral cv`, `referral train`, `referral export`,
    /// `referral coverage`, and its zoom-in step: `referral zoom-cv`, `referral zoom-train`.
    #[command(subcommand)]
    Referral(ReferralCommand),
    /// Heatmaps of the referral network for the workstation: for each photo, the S1 map
    /// (how much each pixel moves the referral decision, by backpropagation; Quellec et
    /// al. 2017) and the attention map, blended onto the photo with the top attention
    /// boxes outlined, as OUT/<name>-s1.png and OUT/<name>-attention.png; prints each
    /// photo's referral score.
    Heatmap {
        /// Referral weights (`referral train`'s OUT/referral.safetensors).
        #[arg(long)]
        weights: PathBuf,
        /// The crop classifier's weights (`referral zoom-train`): the printed score is then
        /// the device's refer_score for a set with a zoom-in step; without them, the
        /// network's own score, labelled so.
        #[arg(long)]
        zoom_weights: Option<PathBuf>,
        /// Model set with a [referral] section (input side, boxes) and the preprocessing.
        #[arg(long, default_value = "models")]
        models: PathBuf,
        /// A photo or a folder of photos (searched recursively).
        #[arg(long)]
        input: PathBuf,
        /// Where to write the pictures (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Show the libtorch device training would use, CUDA availability and torch threads;
    /// with datasets (the same --dataset/--root pairs as `train`), also what the
    /// canonical-scale step does to each: photo sizes, FOV diameters, the scale applied and
    /// the MA diameters before and after it.
    Info {
        #[command(flatten)]
        data: DataArgs,
        /// Only list the photos the readers found, one per line: dataset, file name and
        /// path, tab-separated (what scripts use to find a photo by the name in a
        /// detections file). Nothing is decoded.
        #[arg(long)]
        paths: bool,
    },
}

#[derive(Subcommand)]
enum ReferralCommand {
    /// Cross-validation by patient on the graded photos: trains one network per fold
    /// (OUT/fold-K/referral.safetensors), scores its held-out photos (OUT/fold-K.csv) and,
    /// once every fold is done, prints and writes OUT/referral-cv.json: AUC and
    /// sensitivity at 85% and 90% specificity of the referral score, of the cascade's MA
    /// count (with --ma-detections) and of both, and the refer rule chosen on the CV.
    Cv {
        #[command(flatten)]
        args: ReferralArgs,
        /// Output folder: per-fold weights and scores, the summary.
        #[arg(long)]
        out: PathBuf,
        /// Number of folds (patients, in name order and by referable or not, go to fold
        /// j mod K; both eyes of a patient stay together).
        #[arg(long, default_value_t = 5)]
        folds: usize,
        /// Run only this fold (1-based), to spread the CV over several runs; the summary
        /// is made by the run that finds every fold done. Without it, folds already done
        /// in OUT (their fold-K.csv written) are kept, so an interrupted CV resumes and a
        /// finished one is only summarised again (e.g. with --ma-detections).
        #[arg(long)]
        fold: Option<usize>,
        /// `ma-device detect` output on the same graded photos with the shipped cascade:
        /// its MA counts are the baseline and may join the refer rule.
        #[arg(long, value_name = "FILE.jsonl")]
        ma_detections: Option<PathBuf>,
    },
    /// The zoom-in step (Zoom-in-Net's C-Net) on a finished `referral cv`: for each fold,
    /// that fold's network picks every photo's strongest attention cells, which are
    /// cropped from the full-resolution preprocessed photo; a crop classifier is trained
    /// on the training photos' crops (each labelled with its photo's grade) and scores
    /// the held-out photos (mean margin of their crops). Prints and writes
    /// OUT/zoom-cv.json the AUC and sensitivity at 85%/90% specificity of the referral
    /// network, the crop classifier and the mean of both margins; OUT/zoom-cv.csv per
    /// photo; OUT/fold-K/zoom.safetensors. --epochs, --batch, --lr and --seed here train
    /// the crop classifier.
    ZoomCv {
        #[command(flatten)]
        args: ReferralArgs,
        /// `referral cv`'s OUT: every fold's weights (fold-K/referral.safetensors).
        #[arg(long)]
        cv: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Number of folds (as `referral cv` ran them).
        #[arg(long, default_value_t = 5)]
        folds: usize,
        #[command(flatten)]
        zoom: ZoomArgs,
        /// `ma-device detect` output on the same graded photos: the MA-count baseline and
        /// the refer rule of the merged score, as `referral cv --ma-detections`.
        #[arg(long, value_name = "FILE.jsonl")]
        ma_detections: Option<PathBuf>,
    },
    /// Train the zoom-in crop classifier on every graded photo, on the crops that the
    /// referral network --weights (`referral train`'s, trained on every photo) picks:
    /// OUT/zoom.safetensors. Use the settings `referral zoom-cv` measured.
    ZoomTrain {
        #[command(flatten)]
        args: ReferralArgs,
        /// The referral network's weights.
        #[arg(long)]
        weights: PathBuf,
        /// Output folder (zoom.safetensors).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        zoom: ZoomArgs,
    },
    /// Where a lesion set's MAs fall in the attention maps (Zoom-in-Net's figure): the
    /// fewest top attention cells per photo that hold 50% and 80% of the annotated
    /// lesions, and the share in the 4 cells `detect` reports as boxes.
    Coverage {
        /// Referral weights.
        #[arg(long)]
        weights: PathBuf,
        /// Model set with a [referral] section and the preprocessing.
        #[arg(long, default_value = "models")]
        models: PathBuf,
        /// The lesion set whose annotated MAs to look for.
        #[command(flatten)]
        set: LesionSetArgs,
        /// Also score the S1 heatmap as a lesion detector (Quellec et al.'s evaluation):
        /// each photo's 50 strongest local maxima inside the field of view are
        /// detections, scored with the lesion-level FROC rules of `eval` (sensitivity
        /// at 1/8..8 FP/image, CPM).
        #[arg(long)]
        heatmap_froc: bool,
    },
    /// Train on every graded photo: OUT/referral.safetensors.
    Train {
        #[command(flatten)]
        args: ReferralArgs,
        /// Output folder (referral.safetensors).
        #[arg(long)]
        out: PathBuf,
    },
    /// Add the trained network to a model set (referral-float.onnx, referral-int8.onnx,
    /// the manifest's [referral] section with the rule and AUC of the CV), leaving its
    /// other models as they are; the manifest changes, so sign it again (--sign).
    Export {
        /// `referral train`'s weights.
        #[arg(long)]
        weights: PathBuf,
        /// `referral zoom-train`'s weights: adds the zoom-in step (zoom-{float,int8}.onnx,
        /// [referral.zoom]); --cv must then be `referral zoom-cv`'s OUT.
        #[arg(long)]
        zoom_weights: Option<PathBuf>,
        /// `referral cv`'s OUT (referral-cv.json), or `referral zoom-cv`'s with
        /// --zoom-weights (the rule and AUC of the merged score).
        #[arg(long)]
        cv: PathBuf,
        /// The model set to add it to.
        #[arg(long, default_value = "models")]
        models: PathBuf,
        /// New release name of the set.
        #[arg(long)]
        version: String,
        /// Sign the updated manifest with this secret key.
        #[arg(long, value_name = "KEY")]
        sign: Option<PathBuf>,
    },
}

/// Which crops the zoom-in step takes: `referral zoom-cv` and `zoom-train` share them
/// (`referral export` keeps zoom-cv's in the manifest).
#[derive(Args)]
struct ZoomArgs {
    /// Crops a photo is scored on: its strongest attention cells (the boxes the device
    /// reports).
    #[arg(long, default_value_t = 4)]
    crops: usize,
    /// Crops per training photo (the strongest first; at least --crops).
    #[arg(long, default_value_t = 8)]
    train_crops: usize,
    /// Side of a crop in attention cells (16 input pixels each), centred on its cell.
    #[arg(long, default_value_t = 1.5)]
    crop_cells: f64,
}

impl ZoomArgs {
    fn settings(&self) -> ZoomSettings {
        ZoomSettings {
            crops: self.crops,
            train_crops: self.train_crops,
            cells: self.crop_cells,
            ..ZoomSettings::default()
        }
    }
}

#[derive(Args)]
struct ReferralArgs {
    /// The graded set's root (holds `DR and maculopathy 10 classes/`).
    #[arg(long, default_value = "../shared/datasets/dr_grading")]
    data: PathBuf,
    /// Preprocess with this model set's [preprocess] settings (the cascade's: the device
    /// preprocesses a photo once for both).
    #[arg(long, default_value = "models")]
    models: PathBuf,
    /// Side of the network's square input (a multiple of 16): the field of view averaged
    /// down to it.
    #[arg(long, default_value_t = 320)]
    side: usize,
    /// Training epochs (each sees every training photo once, flipped or transposed at
    /// random).
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Photos per training step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Peak learning rate (AdamW, one-cycle schedule).
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Seed of everything random.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Weight of the S1 sparsity cost in the loss (0: none): how spread out each photo's
    /// S1 heatmap is (mean / rms of |d margin / d pixel|, scale-free), trained by double
    /// backpropagation (about 3x slower), after Quellec et al.'s training for sharp,
    /// lesion-like heatmaps.
    #[arg(long, default_value_t = 0.0)]
    s1_penalty: f64,
}

impl ReferralArgs {
    fn data(&self) -> ReferralData {
        ReferralData {
            data: self.data.clone(),
            models: self.models.clone(),
            side: self.side,
            training: ReferralTraining {
                epochs: self.epochs,
                batch_size: self.batch,
                learning_rate: self.lr,
                seed: self.seed,
                s1_penalty: self.s1_penalty,
                ..Default::default()
            },
        }
    }
}

/// What `validate` and `validate-merge` share.
#[derive(Args)]
struct ValidateArgs {
    /// The bundle folder (from `ma-device records export --bundle`).
    #[arg(long)]
    bundle: PathBuf,
    /// The workstation's model set, with its reference weights: the set the device ran.
    #[arg(long, default_value = "models")]
    models: PathBuf,
    /// Key the device's and the workstation's model manifests must be signed with.
    #[arg(long, value_name = "KEY", default_value = "keys/models.pub")]
    public_key: PathBuf,
    /// Accept unsigned model sets (development).
    #[arg(long)]
    allow_unsigned: bool,
    /// Output folder (parts, report.html, report.json, frames.csv).
    #[arg(long)]
    out: PathBuf,
    /// Clinicians' marks: a CSV `image,x,y` (image = the record's file name or the image
    /// SHA-256), or a lesion set's root folder with --truth-dataset (frames matched to its
    /// photos by the SHA-256 of the files).
    #[arg(long)]
    truth: Option<PathBuf>,
    /// Which dataset reader --truth is (a folder).
    #[arg(long, value_enum, requires = "truth")]
    truth_dataset: Option<DatasetKind>,
    /// DiaretDB1 and IDRiD: the published split of --truth; omit for every image.
    #[arg(long, value_enum, requires = "truth_dataset")]
    truth_split: Option<Split>,
    /// Fail (exit code 2) when Cohen's kappa of the refer decisions is below this.
    #[arg(long)]
    min_kappa: Option<f64>,
    /// Fail (exit code 2) when a detection or refer score differs by more than this.
    #[arg(long)]
    max_score_diff: Option<f64>,
}

impl ValidateArgs {
    fn trust(&self) -> Result<signing::ModelTrust> {
        if self.allow_unsigned {
            Ok(signing::ModelTrust::Unsigned)
        } else {
            signing::ModelTrust::key_file(&self.public_key).context("--public-key")
        }
    }

    fn truth(&self) -> Result<Option<validate::Truth>> {
        let Some(path) = &self.truth else {
            return Ok(None);
        };
        Ok(Some(match self.truth_dataset {
            Some(kind) => {
                let load = LoadOptions {
                    split: self.truth_split,
                    confidence_threshold: 0.5,
                };
                let set = Dataset::load(kind, path, &load).with_context(|| {
                    format!(
                        "cannot load the {kind} dataset at {} (--truth)",
                        path.display()
                    )
                })?;
                validate::Truth::dataset(set)?
            }
            None if path.is_dir() => anyhow::bail!(
                "--truth {} is a folder: say which dataset it is with --truth-dataset",
                path.display()
            ),
            None => validate::Truth::csv(path)?,
        }))
    }

    fn limits(&self) -> validate::Limits {
        validate::Limits {
            min_kappa: self.min_kappa,
            max_score_diff: self.max_score_diff,
        }
    }
}

/// Agreement limits not met: `validate` exits with code 2.
#[derive(Debug)]
struct LimitsNotMet(String);

impl std::fmt::Display for LimitsNotMet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "agreement below the limits: {}", self.0)
    }
}

impl std::error::Error for LimitsNotMet {}

fn validate_bundle(a: &ValidateArgs, shard: validate::Shard) -> Result<()> {
    let started = Instant::now();
    let truth = a.truth()?;
    let v = validate::Validation::open(&a.bundle, &a.models, &a.trust()?)?;
    println!(
        "bundle {}: {} records of board {}, model {} ({} frames, {} missing); workstation \
         reference: {} (libtorch, float)",
        a.bundle.display(),
        v.index.records,
        v.index.board,
        v.index.model_version,
        v.index.frames.len(),
        v.index.missing_frames.len(),
        a.models.display()
    );
    let part = validate::run_shard(&v, shard, &a.out)?;
    println!(
        "wrote {} ({:.1} s)",
        part.display(),
        started.elapsed().as_secs_f64()
    );
    if shard.n > 1 {
        println!(
            "shard {}/{} done; once every shard is, run `ma-trainer validate-merge` with the \
             same --bundle and --out",
            shard.k, shard.n
        );
        return Ok(());
    }
    report(a, &v.index, &[part], truth.as_ref())
}

fn validate_merge(a: &ValidateArgs, parts: &[PathBuf]) -> Result<()> {
    let truth = a.truth()?;
    let index = ma_core::bundle::verify(&a.bundle)?;
    let parts = if parts.is_empty() {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&a.out)
            .with_context(|| format!("reading {}", a.out.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("part-"))
            })
            .collect();
        found.sort();
        anyhow::ensure!(
            !found.is_empty(),
            "no part-K-of-N.jsonl in {}",
            a.out.display()
        );
        found
    } else {
        parts.to_vec()
    };
    report(a, &index, &parts, truth.as_ref())
}

fn report(
    a: &ValidateArgs,
    index: &ma_core::bundle::BundleIndex,
    parts: &[PathBuf],
    truth: Option<&validate::Truth>,
) -> Result<()> {
    let (r, pairs) = validate::Report::from_parts(&a.bundle, index, parts, truth, a.limits())?;
    let (json, html) = validate::write_report(&a.out, &r, &pairs)?;
    let csv = a.out.join("frames.csv");
    validate::write_frames_csv(parts, a.max_score_diff, &csv)?;
    let c = r.refer_confusion;
    println!(
        "{} frames compared ({} not: {:?}); refer agreement {:.4}, kappa {:.4} (device/workstation \
         no/no {} no/yes {} yes/no {} yes/yes {}); MAs {} / {} matched {} (rate {:.4}); \
         detection score |diff| max {:.2e} mean {:.2e}; refer_score |diff| max {:.2e}; \
         {} frame(s) disagree; {:.0} ms per frame",
        r.frames_compared,
        r.not_compared.values().sum::<usize>(),
        r.not_compared,
        r.refer_agreement,
        r.kappa,
        c[0][0],
        c[0][1],
        c[1][0],
        c[1][1],
        r.device_mas,
        r.workstation_mas,
        r.matched_mas,
        r.ma_match_rate,
        r.max_score_diff,
        r.mean_score_diff,
        r.refer_score.max_abs,
        r.disagreeing_frames.len(),
        r.workstation_ms_per_frame
    );
    if let Some(t) = &r.truth {
        println!(
            "against --truth ({} frames, {} lesions): CPM device {:.3}, workstation {:.3}",
            t.frames, t.lesions, t.device.cpm, t.workstation.cpm
        );
    }
    println!(
        "wrote {}, {} and {} (one line per frame)",
        html.display(),
        json.display(),
        csv.display()
    );
    if !r.limit_failures.is_empty() {
        return Err(LimitsNotMet(r.limit_failures.join("; ")).into());
    }
    Ok(())
}

/// One lesion set and its ground truth: `eval` and `referral coverage` take it.
#[derive(Args)]
struct LesionSetArgs {
    /// Which dataset reader to use for --root.
    #[arg(long, value_enum)]
    dataset: DatasetKind,
    /// Dataset root folder, laid out as its publisher ships it (e.g.
    /// ../shared/datasets/diaretdb1).
    #[arg(long)]
    root: PathBuf,
    /// DiaretDB1 and IDRiD: this published split; omit for every image the copy has.
    #[arg(long, value_enum)]
    split: Option<Split>,
    /// DiaretDB1 only: a pixel belongs to an MA when its fused expert confidence
    /// (value/252) is at least this; pixels with lower non-zero confidence are uncertain and
    /// ignored.
    #[arg(long, default_value_t = 0.5)]
    threshold: f64,
}

impl LesionSetArgs {
    fn load(&self) -> Result<Dataset> {
        let load = LoadOptions {
            split: self.split,
            confidence_threshold: self.threshold,
        };
        Dataset::load(self.dataset, &self.root, &load).with_context(|| {
            format!(
                "cannot load the {} dataset at {}",
                self.dataset,
                self.root.display()
            )
        })
    }
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    set: LesionSetArgs,
    /// JSONL file written by `ma-device detect` (one line per image, every candidate with
    /// its score).
    #[arg(long)]
    detections: PathBuf,
    /// Also write the FROC curve to this PNG file.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
    /// Also print a table of counts per image.
    #[arg(long)]
    per_image: bool,
}

/// Which datasets to read: `train`, `cv`, `fold-eval`, `score-sweep` and `info` take them.
#[derive(Args)]
struct DataArgs {
    /// Dataset reader for each --root, in the same order. Repeat the pair to train on
    /// several datasets at once (`--dataset diaretdb1 --root A --dataset idrid --root
    /// B`): CV folds are then made per dataset and every figure is reported per dataset
    /// and pooled. With a single --root and no --dataset, DiaretDB1.
    #[arg(long = "dataset", value_enum, value_name = "NAME")]
    datasets: Vec<DatasetKind>,
    /// Dataset root folder (e.g. ../shared/datasets/diaretdb1), one per --dataset.
    #[arg(long = "root", value_name = "DIR")]
    roots: Vec<PathBuf>,
    /// The published split to train on, for the datasets that have one (DiaretDB1,
    /// IDRiD); the others use every image.
    #[arg(long, value_enum, default_value = "train")]
    split: Split,
    /// DiaretDB1 only: fused-confidence threshold that makes a pixel part of an MA.
    #[arg(long, default_value_t = 0.5)]
    threshold: f64,
    /// Preprocess with the `[preprocess]` settings of this model folder's manifest
    /// instead of the current defaults, e.g. `models` to reproduce how the shipped models
    /// were trained (the settings are recorded for `export` either way).
    #[arg(long, value_name = "MODELS_DIR")]
    preprocess_from: Option<PathBuf>,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    data: DataArgs,
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
    /// Stage 2: add W times a triplet loss on the patch embeddings (the 100 features
    /// before the last layer; batch-hard triplets: each patch with the farthest patch of
    /// its class and the closest of the other) to the cross-entropy (Sarhan et al. 2019).
    /// 0 = off. Nothing is added to the exported networks.
    #[arg(
        long,
        value_name = "W",
        default_value_t = 0.0,
        help_heading = "Seed methods"
    )]
    triplet_weight: f64,
    /// The triplet loss's margin, on unit-length embeddings (distances 0 to 2).
    #[arg(
        long,
        value_name = "M",
        default_value_t = 0.2,
        help_heading = "Seed methods"
    )]
    triplet_margin: f64,
    /// Stage 1: ground-truth feature enhancement while training (Li et al. 2021): inside a
    /// 9x9 box round each lesion, the first layer's features are multiplied by 1 + E,
    /// E = 1 - p / (BETA * box mean) for pixels p no brighter than that bound (darker:
    /// stronger), 0 elsewhere. The paper's BETA is 1.5. Off when absent; the exported
    /// networks never have it.
    #[arg(long, value_name = "BETA", help_heading = "Seed methods")]
    gt_enhance: Option<f32>,
    /// Stage 1 sees the image at these scales and fuses them (Sarhan et al. 2019): e.g.
    /// 1,0.5 runs stage 1's layers on the image and on a half-size copy (the same
    /// weights), upsamples the coarse features and joins both before the head. Scales
    /// are 1 followed by smaller powers of two (0.5, 0.25, 0.125). The exported network
    /// takes the same single image and rescales inside; the weight files record the
    /// scales, so `export` and `fold-eval` need no option. Not with --gt-enhance.
    #[arg(
        long,
        value_name = "S,S,...",
        default_value = "1",
        help_heading = "Seed methods"
    )]
    stage1_scales: String,
    /// Camera augmentation: this many extra training copies of each photo, each made to
    /// look as if another camera had taken it by the effects below (at least one is
    /// needed). Held-out images are never augmented. 0 = off.
    #[arg(long, default_value_t = 0, help_heading = "Camera augmentation")]
    camera_copies: usize,
    /// Resolution loss: shrink each copy by a factor drawn in [MIN, 1] (preprocessing
    /// enlarges it back), e.g. 0.5.
    #[arg(long, value_name = "MIN", help_heading = "Camera augmentation")]
    aug_shrink: Option<f64>,
    /// JPEG re-compression at a quality drawn in [LO, HI], e.g. 30,90.
    #[arg(
        long,
        value_name = "LO,HI",
        value_delimiter = ',',
        help_heading = "Camera augmentation"
    )]
    aug_jpeg: Option<Vec<u8>>,
    /// Defocus: Gaussian blur with a sigma drawn in [0, MAX] pixels, e.g. 1.5.
    #[arg(long, value_name = "MAX", help_heading = "Camera augmentation")]
    aug_blur: Option<f32>,
    /// Canonical-scale jitter: FOV diameter target times a factor in [1-J, 1+J], e.g. 0.1.
    #[arg(long, value_name = "J", help_heading = "Camera augmentation")]
    aug_scale_jitter: Option<f64>,
    /// Colour: gamma in [1/G, G] and a gain per channel in [1-C, 1+C], e.g. 1.4,0.15.
    #[arg(
        long,
        value_name = "G,C",
        value_delimiter = ',',
        help_heading = "Camera augmentation"
    )]
    aug_colour: Option<Vec<f64>>,
    /// Red cast: red channel times a factor in [1, MAX], clipped at 255 (cameras that
    /// burn red out), e.g. 2.5.
    #[arg(long, value_name = "MAX", help_heading = "Camera augmentation")]
    aug_red_gain: Option<f64>,
    /// Continue from the last checkpoint in OUT instead of starting over. On a finished
    /// run nothing is trained: `cv --resume` then only re-scores the held-out images with
    /// the current scoring rule and rewrites cv-summary.json (about 40 s per fold).
    #[arg(long)]
    resume: bool,
}

impl TrainArgs {
    /// The camera augmentation the options ask for, checked.
    fn camera_augment(&self) -> Result<CameraAugment> {
        let pair = |name: &str, v: &Option<Vec<f64>>| -> Result<Option<(f64, f64)>> {
            match v.as_deref() {
                None => Ok(None),
                Some([a, b]) => Ok(Some((*a, *b))),
                Some(other) => anyhow::bail!("{name} takes two numbers A,B, got {other:?}"),
            }
        };
        let jpeg = self
            .aug_jpeg
            .as_ref()
            .map(|v| v.iter().map(|&q| f64::from(q)).collect());
        let aug = CameraAugment {
            copies: self.camera_copies,
            min_shrink: self.aug_shrink,
            jpeg_quality: pair("--aug-jpeg", &jpeg)?.map(|(a, b)| (a as u8, b as u8)),
            blur_sigma: self.aug_blur,
            scale_jitter: self.aug_scale_jitter,
            colour: pair("--aug-colour", &self.aug_colour)?,
            red_gain: self.aug_red_gain,
            seed: self.seed,
        };
        let effects = [
            aug.min_shrink.is_some(),
            aug.jpeg_quality.is_some(),
            aug.blur_sigma.is_some(),
            aug.scale_jitter.is_some(),
            aug.colour.is_some(),
            aug.red_gain.is_some(),
        ]
        .iter()
        .filter(|on| **on)
        .count();
        match (aug.copies, effects) {
            (0, 0) => {}
            (0, _) => anyhow::bail!(
                "--aug-* options need --camera-copies N (how many augmented copies of each \
                 photo to train on)"
            ),
            (_, 0) => anyhow::bail!(
                "--camera-copies needs at least one effect (--aug-shrink, --aug-jpeg, \
                 --aug-blur, --aug-scale-jitter, --aug-colour or --aug-red-gain)"
            ),
            _ => {}
        }
        if let Some(s) = aug.min_shrink
            && !(0.1..=1.0).contains(&s)
        {
            anyhow::bail!("--aug-shrink must be in [0.1, 1], got {s}");
        }
        if let Some((lo, hi)) = aug.jpeg_quality
            && !(1 <= lo && lo <= hi && hi <= 100)
        {
            anyhow::bail!("--aug-jpeg LO,HI needs 1 <= LO <= HI <= 100, got {lo},{hi}");
        }
        if let Some(b) = aug.blur_sigma
            && !(0.0..=10.0).contains(&b)
        {
            anyhow::bail!("--aug-blur must be in [0, 10] pixels, got {b}");
        }
        if let Some(j) = aug.scale_jitter
            && !(0.0..0.5).contains(&j)
        {
            anyhow::bail!("--aug-scale-jitter must be in [0, 0.5), got {j}");
        }
        if let Some((g, c)) = aug.colour
            && !((1.0..=3.0).contains(&g) && (0.0..0.5).contains(&c))
        {
            anyhow::bail!("--aug-colour G,C needs G in [1, 3] and C in [0, 0.5), got {g},{c}");
        }
        if let Some(r) = aug.red_gain
            && !(1.0..=4.0).contains(&r)
        {
            anyhow::bail!("--aug-red-gain must be in [1, 4], got {r}");
        }
        Ok(aug)
    }

    /// The settings the device must use with this run's weights.
    fn device_settings(&self) -> Result<DeviceSettings> {
        Ok(DeviceSettings::of(
            &self.data.preprocess()?,
            &self.pipeline()?,
        ))
    }

    fn pipeline(&self) -> Result<PipelineConfig> {
        anyhow::ensure!(
            self.triplet_weight >= 0.0 && self.triplet_weight.is_finite(),
            "--triplet-weight must be 0 (off) or positive, got {}",
            self.triplet_weight
        );
        anyhow::ensure!(
            self.triplet_margin > 0.0 && self.triplet_margin <= 2.0,
            "--triplet-margin must be in (0, 2] (distances between unit vectors), got {}",
            self.triplet_margin
        );
        if let Some(beta) = self.gt_enhance {
            anyhow::ensure!(
                beta > 0.0 && beta.is_finite(),
                "--gt-enhance BETA must be a positive number (the paper's is 1.5), got {beta}"
            );
        }
        let mut cfg = PipelineConfig::default();
        cfg.stage1.epochs = self.epochs1;
        cfg.stage1.learning_rate = self.lr1;
        cfg.stage1.seed = self.seed;
        cfg.stage1_crops = self.crops1;
        cfg.stage2.epochs = self.epochs2;
        cfg.stage2.learning_rate = self.lr2;
        cfg.stage2.seed = self.seed + 1;
        cfg.stage1_gt_enhance = self.gt_enhance;
        cfg.stage1_scales = InputScales::parse(&self.stage1_scales)?;
        cfg.stage2_triplet = (self.triplet_weight > 0.0).then_some(Triplet {
            weight: self.triplet_weight,
            margin: self.triplet_margin,
        });
        cfg.check()?;
        Ok(cfg)
    }
}

impl DataArgs {
    /// The (reader, root) pairs of the command line.
    fn dataset_roots(&self) -> Result<Vec<(DatasetKind, &Path)>> {
        let kinds = match (self.datasets.len(), self.roots.len()) {
            (_, 0) => anyhow::bail!("give at least one --root (dataset folder)"),
            (0, 1) => vec![DatasetKind::Diaretdb1],
            (d, r) if d == r => self.datasets.clone(),
            (d, r) => anyhow::bail!(
                "give one --dataset for each --root, in the same order: got {d} --dataset \
                 and {r} --root"
            ),
        };
        Ok(kinds
            .into_iter()
            .zip(self.roots.iter().map(PathBuf::as_path))
            .collect())
    }

    /// What the images of this run are, for `training-data.json` and the manifest.
    fn training_data<'a>(
        &self,
        images: impl IntoIterator<Item = &'a PreparedImage>,
        augmentation: &CameraAugment,
        settings: DeviceSettings,
    ) -> Result<TrainingData> {
        let kinds: Vec<DatasetKind> = self.dataset_roots()?.into_iter().map(|(k, _)| k).collect();
        let (split, threshold) = (self.split, self.threshold);
        Ok(TrainingData::of(
            images,
            |name| match kinds.iter().find(|k| k.to_string() == name) {
                Some(DatasetKind::Diaretdb1) => {
                    format!("{split} split, redsmalldots >= {threshold}")
                }
                Some(k) if k.has_splits() => format!("{split} split"),
                _ => "every image".to_string(),
            },
            augmentation.describe(),
            settings,
        ))
    }

    fn prepare(&self) -> Result<Vec<PreparedImage>> {
        self.prepare_with(&self.preprocess()?, &CameraAugment::OFF)
    }

    /// The preprocessing every image of the run gets (recorded for the device).
    fn preprocess(&self) -> Result<PreprocessConfig> {
        match &self.preprocess_from {
            None => Ok(PreprocessConfig::default()),
            Some(dir) => Ok(ma_core::manifest::Manifest::load(dir)
                .with_context(|| format!("--preprocess-from {}", dir.display()))?
                .preprocess),
        }
    }

    fn load(&self, kind: DatasetKind, root: &Path) -> Result<Dataset> {
        let opts = LoadOptions {
            split: kind.has_splits().then_some(self.split),
            confidence_threshold: self.threshold,
        };
        Dataset::load(kind, root, &opts)
    }

    /// `info --paths`: every photo of the run's datasets, as the readers list them.
    fn print_paths(&self) -> Result<()> {
        for (kind, root) in self.dataset_roots()? {
            for im in self.load(kind, root)?.images {
                println!("{kind}\t{}\t{}", im.name, im.path.display());
            }
        }
        Ok(())
    }

    fn prepare_with(
        &self,
        preprocess: &PreprocessConfig,
        aug: &CameraAugment,
    ) -> Result<Vec<PreparedImage>> {
        let mut datasets = Vec::new();
        for (kind, root) in self.dataset_roots()? {
            let dataset = self.load(kind, root)?;
            if dataset.images.iter().any(|i| !i.has_truth()) {
                anyhow::bail!(
                    "training needs ground truth: the {kind} dataset at {} has none",
                    root.display()
                );
            }
            if datasets.iter().any(|(name, _)| *name == kind.to_string()) {
                anyhow::bail!("the {kind} dataset is given twice");
            }
            eprintln!(
                "{kind}: {} images from {}",
                dataset.images.len(),
                root.display()
            );
            datasets.push((kind.to_string(), dataset.images));
        }
        prepare_all(&datasets, preprocess, aug)
    }
}

fn train(a: &TrainArgs) -> Result<()> {
    let started = Instant::now();
    // One value each: the settings and augmentation the images are prepared with are the
    // ones recorded. The images are the datasets' photos, then their camera copies.
    let (settings, aug) = (a.device_settings()?, a.camera_augment()?);
    let images = a.data.prepare_with(&settings.preprocess, &aug)?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let pipeline = a.pipeline()?;
    let mut data = a.data.training_data(&images, &aug, settings)?;
    data.methods = pipeline.methods();
    data.save(&a.out)?;
    let all: Vec<usize> = (0..images.len()).collect();
    let cascade = train_cascade(&images, &all, &[], &pipeline, &a.out, a.resume)?;
    for (stage, (vs, _)) in [("stage1", &cascade.stage1), ("stage2", &cascade.stage2)] {
        let path = a.out.join(format!("{stage}.safetensors"));
        vs.save(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("{stage} weights: {}", path.display());
    }
    let copies = images.iter().filter(|im| im.copy_of.is_some()).count();
    println!(
        "trained on {} photos and {copies} camera copies in {:.1} min",
        images.len() - copies,
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

fn cv(a: &TrainArgs, folds: usize, fold: Option<usize>) -> Result<()> {
    let started = Instant::now();
    // Checked before the minutes of preparing the images.
    if fold == Some(0) {
        anyhow::bail!("--fold counts from 1");
    }
    let (settings, aug, pipeline) = (a.device_settings()?, a.camera_augment()?, a.pipeline()?);
    let images = a.data.prepare_with(&settings.preprocess, &aug)?;
    let results = cross_validate(
        &images,
        folds,
        fold.map(|f| f - 1),
        &pipeline,
        &a.out,
        a.resume,
    )?;
    // Each fold's weights can be exported (scripts/cv-device.sh): say what they learned from.
    let of = fold_assignment(&images, folds);
    for r in &results {
        let train = (0..images.len())
            .filter(|&i| of[i] != r.fold)
            .map(|i| &images[i]);
        let mut data = a.data.training_data(train, &aug, settings.clone())?;
        data.methods = pipeline.methods();
        data.save(&a.out.join(format!("fold-{}", r.fold + 1)))?;
    }
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
        if s.per_dataset.len() > 1 {
            print_per_dataset(&s);
        }
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

fn print_dataset_stats(images: &[PreparedImage]) {
    let f = |v: [f64; 3]| format!("{:.1} / {:.1} / {:.1}", v[0], v[1], v[2]);
    for s in dataset_stats(images) {
        let sizes: Vec<String> = s.sizes.iter().map(|(w, h)| format!("{w}x{h}")).collect();
        println!("{}: {} images, {} lesions", s.dataset, s.images, s.lesions);
        println!("  photo sizes: {}", sizes.join(", "));
        println!(
            "  FOV diameter (px, min / median / max): {}",
            f(s.fov_diameter)
        );
        println!(
            "  scale to canonical (min / median / max): {:.3} / {:.3} / {:.3}",
            s.scale[0], s.scale[1], s.scale[2]
        );
        println!(
            "  MA diameter, original px (p10 / median / p90): {}",
            f(s.ma_diameter_original)
        );
        println!(
            "  MA diameter, canonical px (p10 / median / p90): {}",
            f(s.ma_diameter_canonical)
        );
    }
}

/// Each dataset's CV figures over all folds run so far, and the pooled row.
fn print_per_dataset(s: &CvSummary) {
    let folds: String = s.folds_run.iter().map(|k| format!("  fold {k}")).collect();
    println!("dataset       images  lesions{folds}   mean  pooled  recall@150");
    let recall150 = |r: &[(usize, f64)]| {
        r.iter()
            .find(|(k, _)| *k == 150)
            .map_or("-".to_string(), |(_, v)| format!("{v:.3}"))
    };
    for d in &s.per_dataset {
        let per: String = d
            .cpm_per_fold
            .iter()
            .map(|c| format!("  {c:6.3}"))
            .collect();
        println!(
            "{:<12}  {:>6}  {:>7}{per}  {:.3}  {:>6.3}  {:>10}",
            d.dataset,
            d.images,
            d.lesions,
            d.mean_cpm,
            d.pooled_cpm,
            recall150(&d.candidate_recall)
        );
    }
    let per: String = s
        .cpm_per_fold
        .iter()
        .map(|c| format!("  {c:6.3}"))
        .collect();
    println!(
        "{:<12}  {:>6}  {:>7}{per}  {:.3}  {:>6.3}",
        "all", s.images, s.lesions, s.mean_cpm, s.pooled_cpm
    );
}

fn fold_eval(a: &TrainArgs, folds: usize, fold: usize, s1: &Path, s2: &Path) -> Result<()> {
    if fold == 0 || fold > folds {
        anyhow::bail!("--fold must be between 1 and --folds ({folds}), got {fold}");
    }
    let images = a.data.prepare()?;
    let cascade = Cascade {
        stage1: load_net(s1, Stage::Candidates)?,
        stage2: load_net(s2, Stage::Verdict)?,
    };
    let (reports, recall) = evaluate_fold(&images, folds, fold - 1, &cascade, &a.pipeline()?)?;
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
    let images = a.data.prepare()?;
    let cfg = a.pipeline()?;
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
    let data = TrainingData::load(weights)?;
    let (vs1, _) = load_net(&weights.join("stage1.safetensors"), Stage::Candidates)?;
    let (vs2, _) = load_net(&weights.join("stage2.safetensors"), Stage::Verdict)?;
    let training = Training {
        data: data.describe(),
        images: data.images(),
        licence: "research use only (trained on research-use datasets)".to_string(),
        cv_cpm: summary.mean_cpm,
    };
    let release = Release {
        version: version.to_string(),
        default_variant,
        operating_points: summary.operating_points,
        training,
        settings: data.settings,
    };
    let mut manifest = export_model_set(&vs1, &vs2, out, &release)?;
    for role in [Role::Stage1, Role::Stage2] {
        weights::attach(&mut manifest, role, &weights.join(weights::file_name(role)))?;
    }
    write_unsigned(&manifest, out)?;
    for m in &manifest.models {
        println!("wrote {}", out.join(&m.file).display());
    }
    println!(
        "wrote {} (CV CPM {:.3} over folds {:?})",
        out.join(ma_core::manifest::FILE_NAME).display(),
        summary.mean_cpm,
        summary.folds_run
    );
    sign_or_say(out, secret.as_ref())?;
    Ok(())
}

fn referral_export(
    weights: &Path,
    zoom_weights: Option<&Path>,
    cv: &Path,
    models: &Path,
    version: &str,
    sign: Option<&Path>,
) -> Result<()> {
    let secret = sign
        .map(|k| SecretKey::read(k).context("referral export --sign"))
        .transpose()?;
    let manifest = referral_run::export(weights, zoom_weights, cv, models, version)?;
    let cfg = manifest
        .referral
        .as_ref()
        .context("export wrote no [referral]")?;
    println!(
        "added the referral network{} to {} (release {}, CV AUC {:.3}, rule {:?})",
        if cfg.zoom.is_some() {
            " and its zoom-in crop classifier"
        } else {
            ""
        },
        models.display(),
        manifest.version,
        cfg.cv_auc,
        cfg.rule
    );
    sign_or_say(models, secret.as_ref())
}

fn attach_weights(
    models: &Path,
    files: [(Role, Option<PathBuf>); 4],
    version: &str,
    sign: Option<&Path>,
) -> Result<()> {
    let secret = sign
        .map(|k| SecretKey::read(k).context("attach-weights --sign"))
        .transpose()?;
    let mut manifest = ma_core::manifest::Manifest::load(models)?;
    let mut attached = 0;
    for (role, file) in files {
        if let Some(file) = file {
            weights::attach(&mut manifest, role, &file)?;
            println!(
                "{role}: {} exports to the shipped float ONNX file",
                file.display()
            );
            attached += 1;
        }
    }
    anyhow::ensure!(
        attached > 0,
        "no weights given (--stage1, --stage2, --referral, --zoom)"
    );
    manifest.version = version.to_string();
    write_unsigned(&manifest, models)?;
    println!(
        "wrote {} (release {version}, {} reference weights)",
        models.join(ma_core::manifest::FILE_NAME).display(),
        manifest.reference_weights.len()
    );
    sign_or_say(models, secret.as_ref())
}

/// Signs the exported set in `dir` with `key`, or says that it is not signed.
fn sign_or_say(dir: &Path, key: Option<&SecretKey>) -> Result<()> {
    match key {
        Some(key) => println!(
            "wrote {} (signed by key {})",
            signing::sign_manifest(dir, key)?.display(),
            key.public().fingerprint()
        ),
        None => println!(
            "not signed: devices whose board config sets inference.public_key will refuse \
             this bundle (sign it with --sign KEY or `ma-trainer sign`)"
        ),
    }
    Ok(())
}

fn sign(models: &Path, key: &Path) -> Result<()> {
    let secret = SecretKey::read(key).context("sign --key")?;
    let manifest = ma_core::manifest::Manifest::load(models)?;
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
                kind: a.set.dataset,
                root: a.set.root,
                split: a.set.split,
                detections: a.detections,
                confidence_threshold: a.set.threshold,
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
        Command::AttachWeights {
            models,
            stage1,
            stage2,
            referral,
            zoom,
            version,
            sign,
        } => attach_weights(
            &models,
            [
                (Role::Stage1, stage1),
                (Role::Stage2, stage2),
                (Role::Referral, referral),
                (Role::Zoom, zoom),
            ],
            &version,
            sign.as_deref(),
        ),
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
        Command::Referral(ReferralCommand::Cv {
            args,
            out,
            folds,
            fold,
            ma_detections,
        }) => referral_run::cv(&args.data(), &out, folds, fold, ma_detections.as_deref()),
        Command::Referral(ReferralCommand::ZoomCv {
            args,
            cv,
            out,
            folds,
            zoom,
            ma_detections,
        }) => {
            let d = args.data();
            referral_run::zoom_cv(
                &d,
                &cv,
                &out,
                folds,
                &zoom.settings(),
                &d.training,
                ma_detections.as_deref(),
            )
            .map(|_| ())
        }
        Command::Referral(ReferralCommand::Coverage {
            weights,
            models,
            set,
            heatmap_froc,
        }) => {
            let data = set.load()?;
            let c = referral_run::attention_coverage(&weights, &models, &data)?;
            println!(
                "{}: {} photos, {} lesions; of {} attention cells, the top {} hold 50% of the \
                 lesions, the top {} hold 80%; the 4 reported boxes hold {:.1}%",
                c.dataset,
                c.photos,
                c.lesions,
                c.cells,
                c.cells_for_50,
                c.cells_for_80,
                100.0 * c.share_in_top_4
            );
            if heatmap_froc {
                let (r, found, lesions) = referral_run::heatmap_froc(&weights, &models, &data)?;
                let sens: Vec<String> = r
                    .sensitivities
                    .iter()
                    .map(|p| format!("{:.3}", p.sensitivity))
                    .collect();
                println!(
                    "S1 heatmap maxima as detections: sensitivity at 1/8..8 FP/image {}, CPM \
                     {:.3}; lesions found by any of the {} maxima per photo: {found} of {lesions}",
                    sens.join(" "),
                    r.cpm,
                    referral_run::HEATMAP_MAXIMA
                );
            }
            Ok(())
        }
        Command::Referral(ReferralCommand::Train { args, out }) => {
            referral_run::train(&args.data(), &out).map(|_| ())
        }
        Command::Referral(ReferralCommand::Export {
            weights,
            zoom_weights,
            cv,
            models,
            version,
            sign,
        }) => referral_export(
            &weights,
            zoom_weights.as_deref(),
            &cv,
            &models,
            &version,
            sign.as_deref(),
        ),
        Command::Referral(ReferralCommand::ZoomTrain {
            args,
            weights,
            out,
            zoom,
        }) => {
            let d = args.data();
            referral_run::zoom_train(&d, &weights, &out, &zoom.settings()).map(|_| ())
        }
        Command::Heatmap {
            weights,
            zoom_weights,
            models,
            input,
            out,
        } => referral_run::heatmaps(&weights, zoom_weights.as_deref(), &models, &input, &out)
            .map(|_| ()),
        Command::Validate { args, shard } => validate_bundle(&args, shard),
        Command::ValidateMerge { args, parts } => validate_merge(&args, &parts),
        Command::Keygen { out } => keygen(&out),
        Command::Sign { models, key } => sign(&models, &key),
        Command::Info { data, paths: true } => data.print_paths(),
        Command::Info { data, paths: false } => {
            info();
            if data.roots.is_empty() && data.datasets.is_empty() {
                return Ok(());
            }
            // The same reading and preprocessing as `train`.
            print_dataset_stats(&data.prepare()?);
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ma-trainer: error: {e:#}");
            if e.downcast_ref::<LimitsNotMet>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
