//! `ma-device`: the command-line face of the device runtime.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use std::io::Write;

use ma_core::detection::{DetectLine, ImageDetections, ImageFailure, ReferralFields};
use ma_core::image_io;
use ma_core::manifest::{OperatingPoint, Variant};
use ma_core::preprocess::{self, FovSource};
use ma_core::signing::ModelTrust;
use ma_device::board::BoardConfig;
use ma_device::cascade::onnx;
use ma_device::cascade::{Cascade, ImageResult, Referral};
use ma_device::display::Canvas;
use ma_device::display::overlay::{OverlayInfo, STATUS_BAR_HEIGHT, draw_overlay};
use ma_device::files::{Protected, portable_name};
use ma_device::records;
use ma_device::run_loop::{Detector, RunSummary, Station, stop_on_signals};
use ma_device::{console, errln, outln};
#[cfg(feature = "synthetic")]
use ma_synthetic::SyntheticParams;

#[derive(Parser)]
#[command(
    name = "ma-device",
    version,
    about = "Offline microaneurysm detector for fundus photographs (device runtime)",
    long_about = "Offline microaneurysm detector for fundus photographs (device runtime).\n\n\
        Every image is brought to a canonical scale (field-of-view diameter of DiaretDB1 \
        photographs), its background is subtracted and its contrast normalised; the CNN \
        cascade then marks microaneurysms.\n\n\
        On a board, `run` is the main job (camera or replayed photos in, results on the \
        panel and in the records log); `records` reads that log back. `detect` is the batch \
        tool for evaluation, `preprocess` and `synth` are for inspection, tests and demos.",
    after_help = "Examples:\n  \
        ma-device run --board board-configs/desktop-sim.toml\n  \
        ma-device records list --log out/records.log\n  \
        ma-device records export --log out/records.log --format csv --output records.csv\n  \
        ma-device detect --input photos/ --output detections.jsonl\n\n\
        `ma-device help <command>` or `ma-device <command> --help` explains each command."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the device loop on a board: frames in, detections on the panel and in the log.
    ///
    /// The board config (TOML, see board-configs/) names the frame source (synthetic
    /// frames, a folder of photos, or a V4L2 camera with its trigger), the panel (PNG
    /// files or the Linux framebuffer), the models folder and operating point (1fp, 2fp
    /// or 4fp: the manifest's score threshold for that many false positives per image),
    /// and the records log.
    ///
    /// For each frame: the cascade runs; with records.frames set, the frame itself is
    /// kept (lossless, named by its SHA-256, the oldest deleted beyond
    /// records.frames_budget_mb) for `records export --bundle`; one record (time, frame
    /// number, source name, SHA-256 of the image, every candidate, MA count and referral,
    /// the referral network's refer_score and attention boxes, the frame's file, model
    /// version, board) is appended to the log and synced to disk, and only then is the
    /// frame shown, circles on the MAs
    /// and a status bar with the MA count, REFER / no refer and the refer_score,
    /// latency, frame number, camera state and "saved #N". The board's [controls] may
    /// name a key or button (heatmap_toggle; on the desktop board the line "h" + Enter)
    /// that blends the referral network's attention heatmap into the photo on the panel
    /// and takes it off again. Unreadable frames and camera
    /// failures are shown, logged as error records and retried (camera: with back-off);
    /// they never stop the loop.
    ///
    /// Runs until the source is exhausted or SIGINT (Ctrl-C) / SIGTERM: the frame in
    /// progress is finished and its record written, then the run exits with status 0
    /// and prints where the screens and the records log are. A second signal exits at
    /// once. Exit status 1: the board config or models could not be loaded, or some
    /// record could not be saved. A closed stdout or stderr (the reader of a pipe gone)
    /// only drops messages: every frame is still processed and recorded.
    ///
    /// Model bundles must be signed (ed25519, manifest.toml.sig) by the key named in the
    /// board config's inference.public_key; anything else is refused before a model is
    /// parsed.
    ///
    /// Relative paths in the config are relative to the current directory.
    Run {
        /// The board config.
        #[arg(long, default_value = "board-configs/desktop-sim.toml")]
        board: PathBuf,
        /// Development only: run models whose signature is missing or not checked. Said
        /// on stderr and on every screen.
        #[arg(long)]
        allow_unsigned: bool,
    },
    /// Read the device's records log: list it, export it as JSON lines or CSV, or export a
    /// field-validation bundle (records, frames, model manifest) for the workstation.
    ///
    /// The log is read without being modified, so this is safe while `run` appends to
    /// it. Damaged records (CRC mismatch) and a torn final record (power lost while
    /// writing) are skipped and reported on stderr; the valid records are still output.
    /// Logs of format version 1 (before refer_score and attention_boxes) are read too;
    /// `run` moves such a log aside (records.log -> records.log.v1) and starts a new one.
    Records {
        #[command(subcommand)]
        command: RecordsCommand,
    },
    /// Detect microaneurysms in an image or a folder of images (batch tool).
    ///
    /// Writes one JSON line per image, in sorted path order, flushed after each:
    /// {"image", "width", "height", "detections": [{"x", "y", "score"}], "elapsed_ms"},
    /// with every candidate scoring >= 0.01, best first, in original pixel
    /// coordinates. When the model set has a referral network, the line also carries
    /// "refer_score" (0..1, higher = more likely referable DR, moderate or worse),
    /// "refer" (the manifest's refer rule on that score and the MA findings) and
    /// "attention_boxes" ([{"x0", "y0", "x1", "y1", "weight"}], the regions the network
    /// weighed most). An image that cannot be read or processed gives
    /// {"image", "error"}; the run goes on and the exit code is 1 at the end.
    ///
    /// The model bundle must be signed by the release key built into this binary
    /// (keys/models.pub) or by --public-key.
    Detect {
        /// Folder with manifest.toml and the ONNX models. Default: ./models if it
        /// exists, else the models/ folder of the source tree this binary was built from.
        #[arg(long)]
        models: Option<PathBuf>,
        /// An image file or a folder (searched recursively for .png .jpg .jpeg .tif
        /// .tiff .bmp .ppm, any case).
        #[arg(long)]
        input: PathBuf,
        /// JSONL output file (never one of the input images: refused).
        #[arg(long)]
        output: PathBuf,
        /// Threads for the network arithmetic. Default: every core of this machine (the
        /// summary line says how many were used).
        #[arg(long)]
        threads: Option<usize>,
        /// Model variant (float or int8); default: the manifest's.
        #[arg(long)]
        variant: Option<Variant>,
        /// Also write each image with its MAs circled (colour by score) as PNG here.
        /// Names are flat and portable: the path below the input folder with characters
        /// other than ASCII letters, digits, . _ - replaced by _, plus a short hash of the
        /// path when anything was replaced or cut. A photo whose annotation cannot be
        /// written gets an error line.
        #[arg(long)]
        annotate: Option<PathBuf>,
        /// Also write each image with the referral network's attention map blended in
        /// and its attention boxes outlined, as PNG here (names as --annotate's). Needs
        /// a model set with a referral network.
        #[arg(long, value_name = "DIR")]
        heatmaps: Option<PathBuf>,
        /// Operating point for --annotate circles and the summary: 1, 2 or 4 false
        /// positives per image (thresholds from the manifest).
        #[arg(long, default_value_t = 2)]
        operating_point: u32,
        /// Public key file the model bundle must be signed with. Default: the release
        /// key built into this binary.
        #[arg(long, value_name = "FILE", conflicts_with = "allow_unsigned")]
        public_key: Option<PathBuf>,
        /// Development only: do not check the bundle's signature (hashes are still
        /// checked). Said on stderr.
        #[arg(long)]
        allow_unsigned: bool,
    },
    /// Preprocess images and write what the networks see as PNG pictures.
    ///
    /// Without --input, runs on built-in synthetic fundus frames. Each output picture
    /// maps the normalised channels to grey levels: mid-grey is background, dark spots
    /// are candidate lesions.
    Preprocess {
        /// An image file or a folder (searched recursively for .png .jpg .jpeg .tif
        /// .tiff .bmp .ppm). Default: built-in synthetic frames.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Where to write the pictures.
        #[arg(long, default_value = "out/preprocess")]
        output_dir: PathBuf,
        /// A field-of-view mask image (non-zero = inside) to use instead of estimating
        /// it; must have the size of every input image.
        #[arg(long)]
        fov_mask: Option<PathBuf>,
        /// Number of synthetic frames when no --input is given.
        #[arg(long, default_value_t = 3)]
        synthetic: usize,
        /// Model folder whose manifest's [preprocess] settings to use, so the pictures
        /// show what those models see (only the settings are read: nothing is run, and
        /// the signature is not checked).
        #[arg(long, default_value = "models")]
        models: PathBuf,
    },
    /// Write synthetic fundus images with known microaneurysms, for tests and demos.
    ///
    /// Writes frame-NNN.png and frame-NNN.json (the positions and radii of the MAs
    /// and of the look-alikes drawn) for each frame.
    #[cfg(feature = "synthetic")]
    Synth {
        /// Where to write the frames.
        #[arg(long)]
        output_dir: PathBuf,
        #[arg(long, default_value_t = 4)]
        count: usize,
        /// Seed of the first frame; frame i uses seed + i.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Small 512-px frames instead of 1500x1152.
        #[arg(long)]
        small: bool,
    },
}

#[derive(Subcommand)]
enum RecordsCommand {
    /// One line per record: index, time, source, MA count and REFER, or FAILED and why.
    ///
    /// Each line: the record's index (the "saved #N" of the screen), time (UTC), frame
    /// number, source, image size, MA count and REFER (or FAILED with the reason), number
    /// of candidates, processing time, model version, board, first 12 hex digits of the
    /// image's SHA-256. A count of the records follows on stderr.
    List {
        /// The records log (the board config's records.log, e.g. out/records.log).
        #[arg(long)]
        log: PathBuf,
    },
    /// Every record with every field, as JSON lines or CSV.
    ///
    /// jsonl: one JSON object per record with the record's fields (image_sha256 in hex,
    /// time_unix_ms in milliseconds since 1970 UTC, every candidate with full precision).
    /// csv: a header row, then one row per record (RFC 4180, CRLF line ends); time is
    /// ISO-8601 UTC, detections are "x:y:score" joined by ";".
    ///
    /// With --bundle DIR --board CONFIG: a bundle for the workstation (`ma-trainer
    /// validate --bundle DIR`) instead: the board's records (from --since, before --until)
    /// as DIR/records.jsonl, the frames they name from its frames archive
    /// (records.frames) in DIR/frames/, the model manifest and signature it runs
    /// (inference.models) in DIR/models/, and DIR/bundle.toml (board, model version,
    /// every file's SHA-256), written last. Records of another model version than the
    /// board's current set are left out (and counted). Running it again is idempotent;
    /// an export cut short has no bundle.toml and is refused on import.
    #[command(verbatim_doc_comment)]
    Export {
        /// The records log (jsonl and csv).
        #[arg(long, required_unless_present = "bundle", conflicts_with = "bundle")]
        log: Option<PathBuf>,
        /// Output format (jsonl and csv).
        #[arg(
            long,
            value_enum,
            required_unless_present = "bundle",
            conflicts_with = "bundle"
        )]
        format: Option<ExportFormat>,
        /// Output file; default: standard output.
        #[arg(long, conflicts_with = "bundle")]
        output: Option<PathBuf>,
        /// Write a validation bundle into this folder (new, empty, or an earlier bundle).
        #[arg(long, value_name = "DIR", requires = "board")]
        bundle: Option<PathBuf>,
        /// The board config whose records, frames and models go into the bundle.
        #[arg(long, value_name = "CONFIG")]
        board: Option<PathBuf>,
        /// Only records from this UTC time on: YYYY-MM-DD[THH:MM[:SS]].
        #[arg(long, requires = "bundle")]
        since: Option<String>,
        /// Only records before this UTC time: YYYY-MM-DD[THH:MM[:SS]].
        #[arg(long, requires = "bundle")]
        until: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ExportFormat {
    Jsonl,
    Csv,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        errln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Detect {
            models,
            input,
            output,
            threads,
            variant,
            annotate,
            heatmaps,
            operating_point,
            public_key,
            allow_unsigned,
        } => {
            let models = models.unwrap_or_else(default_models_dir);
            let trust = if allow_unsigned {
                warn_unsigned();
                ModelTrust::Unsigned
            } else if let Some(key) = public_key {
                ModelTrust::key_file(&key).context("--public-key")?
            } else {
                ModelTrust::release()
            };
            let failed = run_detect(&DetectArgs {
                trust: &trust,
                models: &models,
                input: &input,
                output: &output,
                threads: threads.unwrap_or_else(every_core),
                variant,
                annotate: annotate.as_deref(),
                heatmaps: heatmaps.as_deref(),
                operating_point,
            })?;
            if failed > 0 {
                errln!(
                    "{failed} image(s) failed: see the error lines in {}",
                    output.display()
                );
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Preprocess {
            input,
            output_dir,
            fov_mask,
            synthetic,
            models,
        } => run_preprocess(
            input.as_deref(),
            &output_dir,
            fov_mask.as_deref(),
            synthetic,
            &models,
        ),
        #[cfg(feature = "synthetic")]
        Command::Synth {
            output_dir,
            count,
            seed,
            small,
        } => run_synth(&output_dir, count, seed, small),
        Command::Run {
            board,
            allow_unsigned,
        } => {
            if allow_unsigned {
                warn_unsigned();
            }
            let summary = run_board(&board, allow_unsigned)?;
            if summary.records_unsaved > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Records { command } => match command {
            RecordsCommand::List { log } => records_list(&log),
            RecordsCommand::Export {
                log,
                format,
                output,
                bundle,
                board,
                since,
                until,
            } => match (bundle, board, log, format) {
                (Some(dir), Some(board), _, _) => {
                    export_bundle(&board, &dir, since.as_deref(), until.as_deref())
                }
                (None, _, Some(log), Some(format)) => {
                    records_export(&log, format, output.as_deref())
                }
                _ => anyhow::bail!(
                    "records export needs --log and --format, or --bundle and --board"
                ),
            },
        },
    }
}

/// `run`: the device loop on a board config until the source ends or a signal stops it.
fn run_board(board: &Path, allow_unsigned: bool) -> Result<RunSummary> {
    let config = BoardConfig::load(board)?;
    // Installed before the models load, so an early Ctrl-C is not lost.
    let stop = stop_on_signals()?;
    let (mut station, report) = Station::from_board(&config, allow_unsigned)
        .with_context(|| format!("board {} ({})", config.name, board.display()))?;
    if !report.is_clean() || report.moved_aside.is_some() {
        errln!(
            "warning: records log {}: {report}",
            station.log.path().display()
        );
    }
    let summary = station.run(&stop);
    // The records are saved by now; a reader that went away (`run | head`) only loses
    // this summary, it does not turn a good run into a failed one.
    let _ = outln!("{summary}");
    Ok(summary)
}

/// Reads a records log, reporting skipped or torn records on stderr.
fn read_records(log: &Path) -> Result<Vec<records::Record>> {
    let (list, report) = records::read_all(log)?;
    if !report.is_clean() {
        errln!("warning: records log {}: {report}", log.display());
    }
    Ok(list)
}

fn records_list(log: &Path) -> Result<()> {
    let list = read_records(log)?;
    let mut out = std::io::stdout().lock();
    let written = out
        .write_all(records::list_summary(&list).as_bytes())
        .and_then(|()| out.flush());
    ignore_broken_pipe(written.map_err(anyhow::Error::from))?;
    errln!("{} record(s) in {}", list.len(), log.display());
    Ok(())
}

fn export_bundle(board: &Path, dir: &Path, since: Option<&str>, until: Option<&str>) -> Result<()> {
    let config = BoardConfig::load(board)?;
    let time = |t: Option<&str>, flag: &str| -> Result<Option<(i64, String)>> {
        t.map(|t| {
            records::parse_time_utc(t)
                .with_context(|| flag.to_string())
                .map(|ms| (ms, t.to_string()))
        })
        .transpose()
    };
    let request = ma_device::bundle::ExportRequest {
        board: &config,
        out: dir,
        since: time(since, "--since")?,
        until: time(until, "--until")?,
    };
    let done = ma_device::bundle::export(&request).with_context(|| {
        format!(
            "exporting the bundle of board {} into {}",
            config.name,
            dir.display()
        )
    })?;
    let index = &done.index;
    outln!(
        "bundle {}: {} records of model {} (board {}), {} frames ({} copied now, {} stale \
         removed), {:.1} MiB{}",
        dir.display(),
        index.records,
        index.model_version,
        index.board,
        index.frames.len(),
        done.copied,
        done.removed,
        done.bytes as f64 / f64::from(1 << 20),
        if index.signature_sha256.is_none() {
            "; the model set is UNSIGNED"
        } else {
            ""
        }
    )?;
    if !index.missing_frames.is_empty() {
        errln!(
            "warning: {} record(s) name a frame the device no longer holds or never kept \
             (listed in bundle.toml as missing_frames): they are validated from their hashes \
             only",
            index.missing_frames.len()
        );
    }
    if index.other_model_records > 0 {
        errln!(
            "warning: {} record(s) in range were made with another model version than {} and \
             are not in the bundle",
            index.other_model_records,
            index.model_version
        );
    }
    Ok(())
}

fn records_export(log: &Path, format: ExportFormat, output: Option<&Path>) -> Result<()> {
    // The export must never land on the log it reads (`--output` naming the log, a hard
    // link or symlink to it, or `>> log`): checked by file identity before writing.
    let protected = Protected::new([log], "records log");
    let list = read_records(log)?;
    let write = |w: &mut dyn Write| match format {
        ExportFormat::Jsonl => records::to_jsonl(&list, w),
        ExportFormat::Csv => records::to_csv(&list, w),
    };
    match output {
        None => {
            protected.check_stdout()?;
            ignore_broken_pipe(write(&mut std::io::stdout().lock()))
        }
        Some(path) => {
            let file = protected.create(path)?;
            let mut file = std::io::BufWriter::new(file);
            write(&mut file).with_context(|| format!("cannot write {}", path.display()))?;
            errln!("{} record(s) -> {}", list.len(), path.display());
            Ok(())
        }
    }
}

/// A reader that stopped early (`| head`) is not an error.
fn ignore_broken_pipe(result: Result<()>) -> Result<()> {
    match result {
        Err(e) if console::is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

/// `./models` when run from a checkout, else the source tree's `models/`.
fn default_models_dir() -> PathBuf {
    let local = PathBuf::from("models");
    if local.join(ma_core::manifest::FILE_NAME).exists() {
        local
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
    }
}

/// `--allow-unsigned` must never go unnoticed.
fn warn_unsigned() {
    errln!(
        "WARNING: --allow-unsigned: model signatures are NOT checked. For development \
         only; never use it on a screening device."
    );
}

struct DetectArgs<'a> {
    trust: &'a ModelTrust,
    models: &'a Path,
    input: &'a Path,
    output: &'a Path,
    threads: usize,
    variant: Option<Variant>,
    annotate: Option<&'a Path>,
    heatmaps: Option<&'a Path>,
    operating_point: u32,
}

/// Returns the number of images that failed.
fn run_detect(a: &DetectArgs) -> Result<usize> {
    if a.threads == 0 || a.threads > onnx::MAX_THREADS {
        bail!(
            "--threads must be 1 to {}, got {}",
            onnx::MAX_THREADS,
            a.threads
        );
    }
    onnx::set_threads(a.threads);
    let cascade = Cascade::load(a.models, a.variant, a.trust)
        .with_context(|| format!("cannot load the models in {}", a.models.display()))?;
    let ops = &cascade.manifest.operating_points;
    let Some(op) = OperatingPoint::from_fp_per_image(a.operating_point) else {
        bail!(
            "--operating-point must be 1, 2 or 4 (false positives per image), got {}",
            a.operating_point
        );
    };
    let threshold = ops.threshold(op);
    let files = if a.input.is_dir() {
        image_io::find_images(a.input)?
    } else if a.input.is_file() {
        vec![a.input.to_path_buf()]
    } else {
        bail!("input {} does not exist", a.input.display());
    };
    if files.is_empty() {
        bail!(
            "no images (.png .jpg .jpeg .tif .tiff .bmp .ppm) found in {}",
            a.input.display()
        );
    }
    if a.heatmaps.is_some() && cascade.referral_config().is_none() {
        bail!(
            "--heatmaps needs a model set with a referral network; {} has none",
            a.models.display()
        );
    }
    for dir in [a.annotate, a.heatmaps].into_iter().flatten() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Both write `<name>.png`: in one folder the heatmaps would replace the annotations.
    if let (Some(annotate), Some(heatmaps)) = (a.annotate, a.heatmaps)
        && ma_device::files::same_file(annotate, heatmaps)
    {
        bail!(
            "--annotate and --heatmaps name the same folder ({}); give each its own",
            heatmaps.display()
        );
    }
    // Neither the JSONL output nor an annotation may land on a photo (`--output
    // photo.png`, `--output dir/keep.png`, a link to one): the identities are taken
    // before anything is created or truncated.
    let inputs = Protected::new(files.iter().map(PathBuf::as_path), "input image");
    let out = inputs.create(a.output)?;
    let mut out = std::io::BufWriter::new(out);
    let bar = ProgressBar::new(files.len() as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed}<{eta}]")
            .expect("valid template"),
    );
    if files.len() == 1 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let (mut failed, mut referred) = (0, 0);
    for path in &files {
        // The path below the input folder (or the file name), kept as it is: the JSON
        // name must equal the file's name, `\` included.
        let relative = if a.input.is_dir() {
            path.strip_prefix(a.input).unwrap_or(path)
        } else {
            path.file_name().map_or(path.as_path(), Path::new)
        };
        let name = relative.to_string_lossy().into_owned();
        bar.set_message(name.clone());
        let started = Instant::now();
        let result = image_io::read_image(path)
            .and_then(|img| Ok((cascade.detect(&img)?, img)))
            .and_then(|(r, img)| {
                // A photo whose annotation cannot be written gets an error line; the
                // batch goes on.
                let refer = cascade.refers(&r, threshold);
                if let Some(dir) = a.annotate {
                    let file = dir.join(format!("{}.png", portable_name(relative)));
                    annotate(
                        &inputs,
                        &file,
                        &name,
                        &img,
                        (&r, refer),
                        threshold,
                        &cascade.manifest.version,
                    )
                    .context("cannot write the annotated image")?;
                }
                if let (Some(dir), Some(referral)) = (a.heatmaps, &r.referral) {
                    let file = dir.join(format!("{}.png", portable_name(relative)));
                    write_heatmap(&inputs, &file, &img, referral)
                        .context("cannot write the heatmap image")?;
                }
                Ok((r, refer))
            });
        let line = match result {
            Ok((r, refer)) => {
                let referral = r.referral.as_ref().map(|rr| ReferralFields {
                    refer_score: rr.score,
                    refer,
                    attention_boxes: rr.boxes.clone(),
                });
                referred += usize::from(refer);
                DetectLine::Ok(ImageDetections {
                    image: name,
                    width: r.width,
                    height: r.height,
                    detections: r.detections,
                    elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
                    referral,
                })
            }
            Err(e) => {
                failed += 1;
                DetectLine::Failed(ImageFailure {
                    image: name,
                    error: image_io::one_line(&format!("{e:#}")),
                })
            }
        };
        writeln!(out, "{}", line.to_json_line())
            .and_then(|_| out.flush())
            .with_context(|| format!("cannot write {}", a.output.display()))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let threads = format!(
        "{} thread{}",
        a.threads,
        if a.threads == 1 { "" } else { "s" }
    );
    match cascade.referral_config() {
        Some(cfg) => errln!(
            "{} image(s), {failed} failed, {referred} referred (rule: {}) -> {} ({threads})",
            files.len(),
            describe_rule(&cfg.rule),
            a.output.display()
        ),
        None => errln!(
            "{} image(s), {failed} failed, {referred} with >= 1 MA at {} FP/image (score >= {threshold:.3}) -> {} ({threads})",
            files.len(),
            a.operating_point,
            a.output.display()
        ),
    }
    Ok(failed)
}

/// `detect`'s default thread count: every core (at most what tract accepts).
fn every_core() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(onnx::MAX_THREADS)
}

/// The refer rule in words.
fn describe_rule(rule: &ma_core::referral::ReferRule) -> String {
    match (rule.ma_count, rule.operating_point) {
        (Some(n), Some(op)) => format!(
            "refer_score >= {:.3} or >= {n} MA at {op}",
            rule.score_threshold
        ),
        _ => format!("refer_score >= {:.3}", rule.score_threshold),
    }
}

/// Writes `img` with the referral attention map blended in and the attention boxes
/// outlined, as the PNG file `out` (never over an input image).
fn write_heatmap(
    inputs: &Protected,
    out: &Path,
    img: &image::RgbImage,
    r: &Referral,
) -> Result<()> {
    write_png(inputs, out, &r.picture(img))
}

/// Writes `picture` as the PNG file `out` (never over an input image); a failed write
/// leaves no half-written file behind (a full disk, say).
fn write_png(inputs: &Protected, out: &Path, picture: &image::RgbImage) -> Result<()> {
    let file = inputs.create(out)?;
    let mut writer = std::io::BufWriter::new(file);
    let written = picture
        .write_to(&mut writer, image::ImageFormat::Png)
        .map_err(anyhow::Error::from)
        .and_then(|()| writer.flush().map_err(anyhow::Error::from))
        .with_context(|| format!("cannot write {}", out.display()));
    if written.is_err() {
        let _ = std::fs::remove_file(out);
    }
    written
}

/// Writes `img` with its MAs circled and a status bar, as the PNG file `out` (never over
/// an input image).
fn annotate(
    inputs: &Protected,
    out: &Path,
    name: &str,
    img: &image::RgbImage,
    (r, refer): (&ImageResult, bool),
    threshold: f64,
    version: &str,
) -> Result<()> {
    let info = OverlayInfo {
        detections: r.detections.clone(),
        threshold,
        ma_count: r.ma_count(threshold),
        refer,
        refer_score: r.referral.as_ref().map(|rr| rr.score),
        latency_ms: r.timings.total,
        frame_number: 0,
        source_state: name.to_string(),
        source_ok: true,
        model_version: Some(version.to_string()),
    };
    let mut canvas = Canvas::new(img.width(), img.height() + STATUS_BAR_HEIGHT);
    let Ok(()) = draw_overlay(&mut canvas, img, &info);
    write_png(inputs, out, &canvas.into_image())
}

/// One input frame: a name for the outputs and its pixels (or why it could not be read).
struct Frame {
    name: String,
    image: Result<image::RgbImage>,
}

fn frames(input: Option<&Path>, synthetic_count: usize) -> Result<Vec<Frame>> {
    let Some(input) = input else {
        #[cfg(feature = "synthetic")]
        return Ok((0..synthetic_count)
            .map(|i| Frame {
                name: format!("synthetic-{i:03}"),
                image: Ok(ma_synthetic::generate(&SyntheticParams::default(), i as u64 + 1).image),
            })
            .collect());
        #[cfg(not(feature = "synthetic"))]
        bail!(
            "--input is required: this ma-device was built without the `synthetic` feature, \
             so it has no built-in frames ({synthetic_count} asked for)"
        );
    };
    let files = if input.is_dir() {
        let files = image_io::find_images(input)?;
        if files.is_empty() {
            bail!(
                "no images (.png .jpg .jpeg .tif .tiff .bmp .ppm) found in {}",
                input.display()
            );
        }
        files
    } else if input.exists() {
        vec![input.to_path_buf()]
    } else {
        bail!("input {} does not exist", input.display());
    };
    Ok(files
        .iter()
        .map(|path| Frame {
            name: portable_name(
                &path
                    .strip_prefix(input)
                    .ok()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(path.file_name().map(Path::new).unwrap_or(path))
                    .with_extension(""),
            ),
            image: image_io::read_image(path),
        })
        .collect())
}

fn run_preprocess(
    input: Option<&Path>,
    output_dir: &Path,
    fov_mask: Option<&Path>,
    synthetic_count: usize,
    models: &Path,
) -> Result<()> {
    std::fs::create_dir_all(output_dir)
        .with_context(|| format!("cannot create output folder {}", output_dir.display()))?;
    let mask = fov_mask
        .map(|p| -> Result<_> {
            let img = image::open(p)
                .with_context(|| format!("cannot read FOV mask {}", p.display()))?
                .to_luma8();
            Ok(ma_core::mask::Mask::from_luma(&img, |v| v > 0))
        })
        .transpose()?;
    let cfg = ma_core::manifest::Manifest::load(models)
        .with_context(|| format!("preprocess --models {}", models.display()))?
        .preprocess;
    let frames = frames(input, synthetic_count)?;
    let bar = ProgressBar::new(frames.len() as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"),
    );
    let mut failed = 0;
    for frame in frames {
        bar.set_message(frame.name.clone());
        let result = frame.image.and_then(|img| {
            let start = Instant::now();
            let source = mask
                .as_ref()
                .map_or(FovSource::Estimate, FovSource::Supplied);
            let pre = preprocess::preprocess(&img, source, &cfg)?;
            let ms = start.elapsed().as_secs_f64() * 1e3;
            let out = output_dir.join(format!("{}.png", frame.name));
            preprocess::preview(&pre.planes)
                .save(&out)
                .with_context(|| format!("cannot write {}", out.display()))?;
            Ok(format!(
                "{}: {}x{} -> {}x{} (FOV diameter {:.0} px, scale {:.3}), {ms:.0} ms -> {}",
                frame.name,
                pre.original_size.0,
                pre.original_size.1,
                pre.planes.width,
                pre.planes.height,
                pre.original_fov_diameter,
                pre.scale.length_scale(),
                out.display()
            ))
        });
        match result {
            // Results go to stdout even when the bar is hidden (not a terminal).
            // A closed stdout only loses these lines; the pictures are written.
            Ok(line) => bar.suspend(|| {
                let _ = outln!("{line}");
            }),
            Err(e) => {
                failed += 1;
                let reason = image_io::one_line(&format!("{e:#}"));
                bar.suspend(|| errln!("{}: error: {reason}", frame.name));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if failed > 0 {
        bail!("{failed} image(s) could not be preprocessed");
    }
    Ok(())
}

#[cfg(feature = "synthetic")]
fn run_synth(output_dir: &Path, count: usize, seed: u64, small: bool) -> Result<()> {
    std::fs::create_dir_all(output_dir)
        .with_context(|| format!("cannot create output folder {}", output_dir.display()))?;
    let params = if small {
        SyntheticParams::small()
    } else {
        SyntheticParams::default()
    };
    for i in 0..count {
        let frame = ma_synthetic::generate(&params, seed + i as u64);
        let png = output_dir.join(format!("frame-{i:03}.png"));
        frame
            .image
            .save(&png)
            .with_context(|| format!("cannot write {}", png.display()))?;
        let truth = serde_json::json!({
            "seed": seed + i as u64,
            "width": frame.image.width(),
            "height": frame.image.height(),
            "microaneurysms": frame.microaneurysms.iter()
                .map(|m| serde_json::json!({"x": m.x, "y": m.y, "radius": m.radius}))
                .collect::<Vec<_>>(),
            "lookalikes": frame.lookalikes.iter()
                .map(|l| serde_json::json!({"kind": format!("{:?}", l.kind), "x": l.x, "y": l.y, "radius": l.radius}))
                .collect::<Vec<_>>(),
        });
        let json = output_dir.join(format!("frame-{i:03}.json"));
        std::fs::write(&json, serde_json::to_string_pretty(&truth)?)
            .with_context(|| format!("cannot write {}", json.display()))?;
        let _ = outln!(
            "{}: {} MAs, {} look-alikes",
            png.display(),
            frame.microaneurysms.len(),
            frame.lookalikes.len()
        );
    }
    Ok(())
}
