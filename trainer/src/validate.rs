//! `ma-trainer validate`: does the device give, in the field, the answers of the workstation
//! it was validated on? A bundle from the device (`ma-device records export --bundle`) is
//! checked, every frame in it is re-run through the workstation's reference cascade
//! ([`crate::reference`]: libtorch, float, from the released training weights), and the
//! two are compared frame by frame and overall.
//!
//! The work is split in two so it scales: [`run_shard`] compares the frames of one shard
//! (`--shard K/N`: records K-1, K-1+N, ...) and writes one JSON line per frame to
//! `OUT/part-K-of-N.jsonl`, flushed as it goes (a rerun resumes after the last complete
//! line); [`Report::from_parts`] reads any set of parts that covers every shard once
//! (`validate-merge`) and builds the report, streaming the rows, so neither side holds
//! more than one frame's data at a time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use ma_core::bundle::{self, BundleIndex, BundleRecord, MODELS, RECORDS};
use ma_core::detection::Detection;
use ma_core::digest::sha256_hex;
use ma_core::image_io::decode_image;
use ma_core::manifest::Manifest;
use ma_core::signing::{ModelTrust, read_trusted_manifest};

use crate::froc::{FP_RATES, FrocReport, ImageOutcome};
use crate::ground_truth::{GroundTruth, Lesion};
use crate::plot::{Agreement, bland_altman_png};
use crate::reference::ReferenceCascade;

/// Detections of the device and the workstation within this many pixels are the same
/// lesion.
pub const MATCH_RADIUS: f64 = 2.0;

/// Which part of the records one run compares: records `k - 1`, `k - 1 + n`, ...
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub k: usize,
    pub n: usize,
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (k, n) = s
            .split_once('/')
            .with_context(|| format!("--shard {s:?}: expected K/N, e.g. 3/8"))?;
        let (k, n): (usize, usize) = (
            k.trim()
                .parse()
                .with_context(|| format!("--shard {s:?}: K"))?,
            n.trim()
                .parse()
                .with_context(|| format!("--shard {s:?}: N"))?,
        );
        ensure!(
            n >= 1 && (1..=n).contains(&k),
            "--shard {s:?}: need 1 <= K <= N"
        );
        Ok(Shard { k, n })
    }
}

impl Shard {
    pub const ALL: Shard = Shard { k: 1, n: 1 };

    pub fn holds(self, record: usize) -> bool {
        record % self.n == self.k - 1
    }

    /// File name of this shard's part.
    pub fn part_name(self) -> String {
        format!("part-{}-of-{}.jsonl", self.k, self.n)
    }
}

/// First line of a part: what it belongs to, so parts of different bundles, workstation
/// sets or shard counts are never merged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartHeader {
    pub part: Shard,
    pub bundle_records_sha256: String,
    pub workstation_version: String,
}

/// How one frame compared (one line of a part).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrameRow {
    /// Line of the record in the bundle's records.jsonl.
    pub record: usize,
    pub source: String,
    pub image_sha256: String,
    /// `compared`, or why not: `source error` (no image), `frame missing (evicted)`,
    /// `frame missing (not kept)`.
    pub status: String,
    pub width: u32,
    pub height: u32,
    pub device_refer: bool,
    pub workstation_refer: Option<bool>,
    pub device_refer_score: Option<f64>,
    pub workstation_refer_score: Option<f64>,
    /// MAs at the bundle's operating point, and how many of them pair up within
    /// [`MATCH_RADIUS`].
    pub device_mas: usize,
    pub workstation_mas: usize,
    pub matched_mas: usize,
    /// (device, workstation) scores of the matched MAs.
    pub ma_score_pairs: Vec<(f64, f64)>,
    /// Over every reported detection (score >= 0.01) matched within [`MATCH_RADIUS`]:
    /// count, largest and summed absolute score difference; detections without a partner.
    pub matched_detections: usize,
    pub max_score_diff: f64,
    pub sum_score_diff: f64,
    pub unmatched_detections: usize,
    /// Every reported detection of both sides as `[x, y, score]` (for `--truth`).
    pub device_detections: Vec<[f64; 3]>,
    pub workstation_detections: Vec<[f64; 3]>,
    pub device_error: Option<String>,
    pub workstation_error: Option<String>,
    /// Time the workstation took for the frame (decode to result).
    pub elapsed_ms: f64,
}

impl FrameRow {
    pub fn compared(&self) -> bool {
        self.status == "compared"
    }

    /// Why the frame disagrees (empty when it agrees); `max_score_diff` is the limit a
    /// score difference may reach.
    pub fn disagreements(&self, max_score_diff: Option<f64>) -> Vec<String> {
        let mut why = Vec::new();
        if !self.compared() {
            return why;
        }
        match (&self.device_error, &self.workstation_error) {
            (Some(d), None) => why.push(format!("device failed: {d}")),
            (None, Some(w)) => why.push(format!("workstation failed: {w}")),
            (Some(_), Some(_)) => {}
            (None, None) => {
                if self.workstation_refer != Some(self.device_refer) {
                    why.push(format!(
                        "refer: device {}, workstation {}",
                        yes_no(self.device_refer),
                        self.workstation_refer.map_or("-", yes_no)
                    ));
                }
                let unmatched = self.device_mas + self.workstation_mas - 2 * self.matched_mas;
                if unmatched > 0 {
                    why.push(format!(
                        "MAs: device {}, workstation {}, {} matched",
                        self.device_mas, self.workstation_mas, self.matched_mas
                    ));
                }
                if let Some(limit) = max_score_diff {
                    if self.max_score_diff > limit {
                        why.push(format!(
                            "detection score differs by {:.2e} (> {limit:.2e})",
                            self.max_score_diff
                        ));
                    }
                    if let (Some(d), Some(w)) =
                        (self.device_refer_score, self.workstation_refer_score)
                        && (d - w).abs() > limit
                    {
                        why.push(format!(
                            "refer_score differs by {:.2e} (> {limit:.2e})",
                            (d - w).abs()
                        ));
                    }
                }
            }
        }
        why
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// The bundle, checked, and the workstation's reference cascade for it.
pub struct Validation {
    pub dir: PathBuf,
    pub index: BundleIndex,
    pub reference: ReferenceCascade,
}

impl Validation {
    /// Checks the bundle (complete, every hash, the model manifest's signature as `trust`
    /// says) and that the workstation's set in `models` is the one the device ran (same
    /// version, same files and settings; else the error lists what differs), then loads
    /// the reference cascade.
    pub fn open(dir: &Path, models: &Path, trust: &ModelTrust) -> Result<Self> {
        let index = bundle::verify(dir)?;
        let device_dir = dir.join(MODELS);
        read_trusted_manifest(&device_dir, trust).with_context(|| {
            format!(
                "the model manifest in bundle {} (what the device ran) is not trusted",
                dir.display()
            )
        })?;
        let device = Manifest::load(&device_dir)?;
        let reference = ReferenceCascade::load(models, trust)
            .with_context(|| format!("the workstation's model set {}", models.display()))?;
        let differences = manifest_differences(&device, &reference.manifest);
        if !differences.is_empty() {
            bail!(
                "bundle {} was made with model set {}, the workstation has {} in {}; they \
                 differ in: {}. Validate with the model set the device ran",
                dir.display(),
                device.version,
                reference.manifest.version,
                models.display(),
                differences.join("; ")
            );
        }
        ensure!(
            index.model_version == device.version,
            "bundle {}: bundle.toml says model {}, its manifest is {}",
            dir.display(),
            index.model_version,
            device.version
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            index,
            reference,
        })
    }
}

/// What differs between the device's manifest and the workstation's (the reference
/// weights and the folder aside): version, network files, settings.
pub fn manifest_differences(device: &Manifest, workstation: &Manifest) -> Vec<String> {
    let mut out = Vec::new();
    if device.version != workstation.version {
        out.push(format!(
            "version {} vs {}",
            device.version, workstation.version
        ));
    }
    for d in &device.models {
        match workstation
            .models
            .iter()
            .find(|w| w.role == d.role && w.variant == d.variant)
        {
            Some(w) if w.sha256 == d.sha256 => {}
            Some(_) => out.push(format!("{} {} network file", d.role, d.variant)),
            None => out.push(format!(
                "{} {} network missing on the workstation",
                d.role, d.variant
            )),
        }
    }
    let settings = |m: &Manifest| {
        let mut m = m.clone();
        m.models.clear();
        m.reference_weights.clear();
        m.version.clear();
        m.dir = PathBuf::new();
        m
    };
    if settings(device) != settings(workstation) {
        out.push(
            "settings (preprocessing, candidates, scoring, operating points or referral)".into(),
        );
    }
    out
}

/// Compares every frame of `shard` and appends one [`FrameRow`] per record to
/// `out/part-K-of-N.jsonl` (flushed per frame). Rows already in the part (an interrupted
/// run) are kept and their records skipped. Returns the part's path.
pub fn run_shard(v: &Validation, shard: Shard, out: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join(shard.part_name());
    let header = PartHeader {
        part: shard,
        bundle_records_sha256: v.index.records_sha256.clone(),
        workstation_version: v.reference.manifest.version.clone(),
    };
    let done = resume(&path, &header)?;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if done.is_none() {
        writeln!(file, "{}", serde_json::to_string(&header)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let done = done.unwrap_or_default();
    let todo = (0..v.index.records)
        .filter(|&i| shard.holds(i) && !done.contains(&i))
        .count();
    let missing: HashMap<usize, &str> = v
        .index
        .missing_frames
        .iter()
        .map(|m| (m.record, m.reason.as_str()))
        .collect();
    let bar = crate::pipeline::progress(todo, "frames");
    // One record in memory at a time: the records are read line by line.
    let records_path = v.dir.join(RECORDS);
    let reader = BufReader::new(
        File::open(&records_path).with_context(|| format!("reading {}", records_path.display()))?,
    );
    for (i, line) in reader.lines().enumerate() {
        if !shard.holds(i) || done.contains(&i) {
            continue;
        }
        let line = line.with_context(|| format!("reading {}", records_path.display()))?;
        let record: BundleRecord = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", records_path.display(), i + 1))?;
        let row = compare_frame(v, i, &record, missing.get(&i).copied())?;
        writeln!(file, "{}", serde_json::to_string(&row)?)
            .and_then(|()| file.flush())
            .with_context(|| format!("writing {}", path.display()))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(path)
}

/// The records of an existing part (by record index) when its header is `header`; a torn
/// last line is cut off. `None` when there is no part yet. A part of another bundle or
/// shard layout is refused.
fn resume(path: &Path, header: &PartHeader) -> Result<Option<BTreeSet<usize>>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.split_inclusive('\n');
    let Some(first) = lines.next().filter(|l| l.ends_with('\n')) else {
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        return Ok(None);
    };
    let found: PartHeader = serde_json::from_str(first.trim_end())
        .with_context(|| format!("{}: first line is not a part header", path.display()))?;
    ensure!(
        &found == header,
        "{} belongs to another validation ({found:?}); remove it or choose another --out",
        path.display()
    );
    let mut done = BTreeSet::new();
    let mut keep = first.len();
    for line in lines {
        if !line.ends_with('\n') {
            break; // torn by an interruption
        }
        let row: FrameRow = serde_json::from_str(line.trim_end())
            .with_context(|| format!("{}: a row does not parse", path.display()))?;
        done.insert(row.record);
        keep += line.len();
    }
    if keep < text.len() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.set_len(keep as u64)
            .with_context(|| format!("cutting the torn last line of {}", path.display()))?;
    }
    Ok(Some(done))
}

fn compare_frame(
    v: &Validation,
    i: usize,
    r: &BundleRecord,
    missing: Option<&str>,
) -> Result<FrameRow> {
    let started = Instant::now();
    let dets = |d: &[Detection]| d.iter().map(|d| [d.x, d.y, d.score]).collect::<Vec<_>>();
    let device: Vec<Detection> = r
        .detections
        .iter()
        .map(|d| Detection {
            x: d.x,
            y: d.y,
            score: d.score,
        })
        .collect();
    let mut row = FrameRow {
        record: i,
        source: r.source.clone(),
        image_sha256: r.image_sha256.clone(),
        status: "compared".into(),
        width: r.width,
        height: r.height,
        device_refer: r.refer,
        workstation_refer: None,
        device_refer_score: r.refer_score,
        workstation_refer_score: None,
        device_mas: 0,
        workstation_mas: 0,
        matched_mas: 0,
        ma_score_pairs: Vec::new(),
        matched_detections: 0,
        max_score_diff: 0.0,
        sum_score_diff: 0.0,
        unmatched_detections: 0,
        device_detections: dets(&device),
        workstation_detections: Vec::new(),
        device_error: r.error.clone(),
        workstation_error: None,
        elapsed_ms: 0.0,
    };
    let file = match (&r.frame_file, missing) {
        (_, Some(reason)) => {
            row.status = format!("frame missing ({reason})");
            return Ok(row);
        }
        (Some(file), None) => file,
        (None, None) => {
            row.status = "source error".into();
            return Ok(row);
        }
    };
    let path = BundleIndex::frame_path(&v.dir, file);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let image = decode_image(&bytes).with_context(|| format!("decoding {}", path.display()))?;
    ensure!(
        bundle::frame_matches_record(&bytes, &image, &r.image_sha256),
        "frame {} is not the image of record {i} ({}): neither its bytes nor its pixels hash \
         to the record's {} (file hash {})",
        path.display(),
        r.source,
        r.image_sha256,
        sha256_hex(&bytes)
    );
    ensure!(
        (image.width(), image.height()) == (r.width, r.height) || r.error.is_some(),
        "frame {} is {}x{}, record {i} says {}x{}",
        path.display(),
        image.width(),
        image.height(),
        r.width,
        r.height
    );
    let op = v.index.operating_point;
    match v.reference.run(&image) {
        Ok(result) => {
            let threshold = v.reference.threshold(op);
            row.workstation_refer = Some(v.reference.refers(&result, op));
            row.workstation_refer_score = result.refer_score;
            row.workstation_detections = dets(&result.detections);
            let all = match_detections(&device, &result.detections, 0.0);
            row.matched_detections = all.len();
            row.unmatched_detections = device.len() + result.detections.len() - 2 * all.len();
            for &(a, b) in &all {
                let d = (device[a].score - result.detections[b].score).abs();
                row.max_score_diff = row.max_score_diff.max(d);
                row.sum_score_diff += d;
            }
            let mas = |d: &[Detection]| d.iter().filter(|d| d.score >= threshold).count();
            row.device_mas = mas(&device);
            row.workstation_mas = mas(&result.detections);
            let ma_pairs = match_detections(&device, &result.detections, threshold);
            row.matched_mas = ma_pairs.len();
            row.ma_score_pairs = ma_pairs
                .iter()
                .map(|&(a, b)| (device[a].score, result.detections[b].score))
                .collect();
        }
        Err(e) => row.workstation_error = Some(ma_core::image_io::one_line(&format!("{e:#}"))),
    }
    row.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(row)
}

/// Pairs of (device, workstation) detections scoring at least `min_score`, each used once,
/// within [`MATCH_RADIUS`] of each other, closest pairs first.
pub fn match_detections(a: &[Detection], b: &[Detection], min_score: f64) -> Vec<(usize, usize)> {
    let mut pairs = Vec::new();
    for (i, p) in a.iter().enumerate().filter(|(_, p)| p.score >= min_score) {
        for (j, q) in b.iter().enumerate().filter(|(_, q)| q.score >= min_score) {
            let d = (p.x - q.x).hypot(p.y - q.y);
            if d <= MATCH_RADIUS {
                pairs.push((d, i, j));
            }
        }
    }
    pairs.sort_by(|x, y| x.0.total_cmp(&y.0));
    let (mut used_a, mut used_b) = (vec![false; a.len()], vec![false; b.len()]);
    let mut out = Vec::new();
    for (_, i, j) in pairs {
        if !used_a[i] && !used_b[j] {
            used_a[i] = true;
            used_b[j] = true;
            out.push((i, j));
        }
    }
    out
}

/// Clinicians' marks for `--truth`: a lesion set the trainer reads (matched to frames by
/// the SHA-256 of the photo file, i.e. frames replayed from those files), or a CSV
/// `image,x,y` (one mark per line; `image` is the record's source file name or the image's
/// SHA-256; a frame with no line has no lesion only if its image is listed with empty x
/// and y).
pub enum Truth {
    Dataset(HashMap<String, crate::datasets::DatasetImage>),
    Points(HashMap<String, Vec<(f64, f64)>>),
}

impl Truth {
    /// A lesion set, indexed by the SHA-256 of each photo file.
    pub fn dataset(set: crate::datasets::Dataset) -> Result<Self> {
        let mut map = HashMap::new();
        for image in set.images {
            let bytes = std::fs::read(&image.path)
                .with_context(|| format!("reading {}", image.path.display()))?;
            map.insert(sha256_hex(&bytes), image);
        }
        Ok(Truth::Dataset(map))
    }

    /// A CSV of marks with the header `image,x,y`.
    pub fn csv(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut lines = text.lines();
        let header = lines.next().unwrap_or_default();
        ensure!(
            header.trim().eq_ignore_ascii_case("image,x,y"),
            "{}: the first line must be the header `image,x,y`, got {header:?}",
            path.display()
        );
        let mut map: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
        for (n, line) in lines.enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let [image, x, y] = f[..] else {
                bail!("{} line {}: expected image,x,y", path.display(), n + 2);
            };
            let marks = map.entry(key(image)).or_default();
            if x.is_empty() && y.is_empty() {
                continue; // an image without lesions
            }
            let parse = |v: &str, what: &str| -> Result<f64> {
                v.parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .with_context(|| format!("{} line {}: {what} {v:?}", path.display(), n + 2))
            };
            marks.push((parse(x, "x")?, parse(y, "y")?));
        }
        Ok(Truth::Points(map))
    }

    /// The ground truth of a frame, if the marks cover it.
    fn of(&self, row: &FrameRow) -> Result<Option<GroundTruth>> {
        match self {
            Truth::Dataset(map) => map
                .get(&row.image_sha256.to_ascii_lowercase())
                .map(|img| img.load_truth())
                .transpose(),
            Truth::Points(map) => {
                let name = Path::new(&row.source)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let marks = map
                    .get(&key(&name))
                    .or_else(|| map.get(&key(&row.image_sha256)));
                Ok(marks.map(|marks| GroundTruth {
                    width: row.width,
                    height: row.height,
                    lesions: marks
                        .iter()
                        .map(|&(x, y)| Lesion::disk(x, y, 0.0, row.width, row.height))
                        .collect(),
                    uncertain: None,
                }))
            }
        }
    }
}

fn key(s: &str) -> String {
    s.trim().to_ascii_lowercase()
}

/// Limits under which `validate` fails (exit code 2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub min_kappa: Option<f64>,
    pub max_score_diff: Option<f64>,
}

/// Sensitivity at the CPM rates and the CPM of one side against the truth.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SideFroc {
    pub sensitivities: Vec<(f64, f64)>,
    pub cpm: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TruthComparison {
    pub frames: usize,
    pub lesions: usize,
    pub device: SideFroc,
    pub workstation: SideFroc,
}

/// A frame that disagrees, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Disagreement {
    pub record: usize,
    pub source: String,
    pub image_sha256: String,
    pub reasons: Vec<String>,
}

/// The points of the Bland-Altman plots, (device, workstation) scores: of each frame's
/// referral, and of each matched MA.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScorePairs {
    pub refer: Vec<(f64, f64)>,
    pub ma: Vec<(f64, f64)>,
}

/// The whole comparison (report.json; report.html shows the same).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub bundle: String,
    pub board: String,
    pub model_version: String,
    pub operating_point: String,
    pub records: usize,
    pub frames_compared: usize,
    /// Records not compared, by reason (source errors, missing frames).
    pub not_compared: BTreeMap<String, usize>,
    /// Frames the device or the workstation could not process (both: agreement).
    pub device_failed: usize,
    pub workstation_failed: usize,
    /// Refer decisions of frames both processed: `[[no/no, no/yes], [yes/no, yes/yes]]`
    /// (device first).
    pub refer_confusion: [[usize; 2]; 2],
    pub refer_agreement: f64,
    pub kappa: f64,
    pub device_mas: usize,
    pub workstation_mas: usize,
    pub matched_mas: usize,
    /// matched / (device + workstation - matched): 1 when every MA pairs up.
    pub ma_match_rate: f64,
    /// Every reported detection matched within 2 px: count, largest and mean |difference|;
    /// detections of either side without a partner.
    pub matched_detections: usize,
    pub max_score_diff: f64,
    pub mean_score_diff: f64,
    pub unmatched_detections: usize,
    /// Bland-Altman of the refer scores and of the matched MAs' scores (device - workstation).
    pub refer_score: Agreement,
    pub ma_scores: Agreement,
    pub disagreeing_frames: Vec<Disagreement>,
    pub truth: Option<TruthComparison>,
    pub limits: Limits,
    /// Which limits failed (empty: passed).
    pub limit_failures: Vec<String>,
    pub workstation_ms_per_frame: f64,
}

impl Report {
    /// Reads the parts (all shards of one validation of `v`'s bundle, each once) row by
    /// row and builds the report; with `truth`, the FROC of both sides against it.
    pub fn from_parts(
        v_dir: &Path,
        index: &BundleIndex,
        parts: &[PathBuf],
        truth: Option<&Truth>,
        limits: Limits,
    ) -> Result<(Report, ScorePairs)> {
        let mut seen: BTreeMap<usize, PathBuf> = BTreeMap::new();
        let mut shards_n = None;
        let mut r = Report {
            bundle: v_dir.display().to_string(),
            board: index.board.clone(),
            model_version: index.model_version.clone(),
            operating_point: index.operating_point.as_str().into(),
            records: index.records,
            frames_compared: 0,
            not_compared: BTreeMap::new(),
            device_failed: 0,
            workstation_failed: 0,
            refer_confusion: [[0; 2]; 2],
            refer_agreement: 0.0,
            kappa: 0.0,
            device_mas: 0,
            workstation_mas: 0,
            matched_mas: 0,
            ma_match_rate: 0.0,
            matched_detections: 0,
            max_score_diff: 0.0,
            mean_score_diff: 0.0,
            unmatched_detections: 0,
            refer_score: Agreement::default(),
            ma_scores: Agreement::default(),
            disagreeing_frames: Vec::new(),
            truth: None,
            limits,
            limit_failures: Vec::new(),
            workstation_ms_per_frame: 0.0,
        };
        let (mut refer_pairs, mut ma_pairs) = (Vec::new(), Vec::new());
        let (mut sum_diff, mut ms) = (0.0, 0.0);
        let (mut dev_outcomes, mut ws_outcomes) = (Vec::new(), Vec::new());
        let mut records_seen = BTreeSet::new();
        for part in parts {
            let file = File::open(part).with_context(|| format!("reading {}", part.display()))?;
            let mut lines = BufReader::new(file).lines();
            let header: PartHeader = serde_json::from_str(
                &lines
                    .next()
                    .with_context(|| format!("{} is empty", part.display()))?
                    .with_context(|| format!("reading {}", part.display()))?,
            )
            .with_context(|| format!("{}: first line is not a part header", part.display()))?;
            ensure!(
                header.bundle_records_sha256 == index.records_sha256,
                "{} is a part of another bundle",
                part.display()
            );
            ensure!(
                *shards_n.get_or_insert(header.part.n) == header.part.n,
                "{} splits the records into {} shards, another part into {}",
                part.display(),
                header.part.n,
                shards_n.unwrap_or(0)
            );
            if let Some(other) = seen.insert(header.part.k, part.clone()) {
                bail!(
                    "shard {}/{} given twice: {} and {}",
                    header.part.k,
                    header.part.n,
                    other.display(),
                    part.display()
                );
            }
            for line in lines {
                let line = line.with_context(|| format!("reading {}", part.display()))?;
                let row: FrameRow = serde_json::from_str(&line)
                    .with_context(|| format!("{}: a row does not parse", part.display()))?;
                records_seen.insert(row.record);
                if !row.compared() {
                    *r.not_compared.entry(row.status.clone()).or_default() += 1;
                    continue;
                }
                r.frames_compared += 1;
                ms += row.elapsed_ms;
                let reasons = row.disagreements(limits.max_score_diff);
                if !reasons.is_empty() {
                    r.disagreeing_frames.push(Disagreement {
                        record: row.record,
                        source: row.source.clone(),
                        image_sha256: row.image_sha256.clone(),
                        reasons,
                    });
                }
                match (&row.device_error, &row.workstation_error) {
                    (Some(_), _) | (_, Some(_)) => {
                        r.device_failed += usize::from(row.device_error.is_some());
                        r.workstation_failed += usize::from(row.workstation_error.is_some());
                        continue;
                    }
                    _ => {}
                }
                let ws = row.workstation_refer.unwrap_or(false);
                r.refer_confusion[usize::from(row.device_refer)][usize::from(ws)] += 1;
                if let (Some(d), Some(w)) = (row.device_refer_score, row.workstation_refer_score) {
                    refer_pairs.push((d, w));
                }
                r.device_mas += row.device_mas;
                r.workstation_mas += row.workstation_mas;
                r.matched_mas += row.matched_mas;
                ma_pairs.extend(row.ma_score_pairs.iter().copied());
                r.matched_detections += row.matched_detections;
                r.unmatched_detections += row.unmatched_detections;
                r.max_score_diff = r.max_score_diff.max(row.max_score_diff);
                sum_diff += row.sum_score_diff;
                if let Some(truth) = truth
                    && let Some(gt) = truth.of(&row)?
                {
                    let as_dets = |d: &[[f64; 3]]| {
                        d.iter()
                            .map(|&[x, y, score]| Detection { x, y, score })
                            .collect::<Vec<_>>()
                    };
                    dev_outcomes.push(ImageOutcome::score(
                        &row.source,
                        &gt,
                        &as_dets(&row.device_detections),
                    )?);
                    ws_outcomes.push(ImageOutcome::score(
                        &row.source,
                        &gt,
                        &as_dets(&row.workstation_detections),
                    )?);
                }
            }
        }
        let n = shards_n.unwrap_or(0);
        let missing: Vec<usize> = (1..=n).filter(|k| !seen.contains_key(k)).collect();
        ensure!(
            missing.is_empty(),
            "parts of shards {missing:?} (of {n}) are missing: run `validate --shard K/{n}` \
             for them"
        );
        ensure!(
            records_seen.len() == index.records,
            "the parts hold {} of the bundle's {} records: a shard did not finish (run it \
             again to resume)",
            records_seen.len(),
            index.records
        );
        let c = r.refer_confusion;
        let total = (c[0][0] + c[0][1] + c[1][0] + c[1][1]) as f64;
        if total > 0.0 {
            let po = (c[0][0] + c[1][1]) as f64 / total;
            let dev_yes = (c[1][0] + c[1][1]) as f64 / total;
            let ws_yes = (c[0][1] + c[1][1]) as f64 / total;
            let pe = dev_yes * ws_yes + (1.0 - dev_yes) * (1.0 - ws_yes);
            r.refer_agreement = po;
            // Perfect agreement is kappa 1 even when every decision is the same (pe = 1).
            r.kappa = if po == 1.0 {
                1.0
            } else {
                (po - pe) / (1.0 - pe)
            };
        }
        let union = r.device_mas + r.workstation_mas - r.matched_mas;
        r.ma_match_rate = if union == 0 {
            1.0
        } else {
            r.matched_mas as f64 / union as f64
        };
        if r.matched_detections > 0 {
            r.mean_score_diff = sum_diff / r.matched_detections as f64;
        }
        if r.frames_compared > 0 {
            r.workstation_ms_per_frame = ms / r.frames_compared as f64;
        }
        r.refer_score = Agreement::of(&refer_pairs);
        r.ma_scores = Agreement::of(&ma_pairs);
        if truth.is_some() {
            ensure!(
                !dev_outcomes.is_empty(),
                "--truth covers none of the bundle's compared frames"
            );
            let side = |o: &[ImageOutcome]| -> Result<SideFroc> {
                let f = FrocReport::from_outcomes(o)?;
                Ok(SideFroc {
                    sensitivities: FP_RATES
                        .iter()
                        .zip(&f.sensitivities)
                        .map(|(&rate, p)| (rate, p.sensitivity))
                        .collect(),
                    cpm: f.cpm,
                })
            };
            r.truth = Some(TruthComparison {
                frames: dev_outcomes.len(),
                lesions: dev_outcomes.iter().map(ImageOutcome::lesions).sum(),
                device: side(&dev_outcomes)?,
                workstation: side(&ws_outcomes)?,
            });
        }
        if let Some(min) = limits.min_kappa
            && r.kappa < min
        {
            r.limit_failures
                .push(format!("kappa {:.3} < --min-kappa {min}", r.kappa));
        }
        if let Some(max) = limits.max_score_diff {
            let worst = r.max_score_diff.max(r.refer_score.max_abs);
            if worst > max {
                r.limit_failures.push(format!(
                    "largest score difference {worst:.2e} > --max-score-diff {max:.2e}"
                ));
            }
        }
        let one_sided = r
            .disagreeing_frames
            .iter()
            .filter(|d| d.reasons.iter().any(|w| w.contains(" failed: ")))
            .count();
        if one_sided > 0 && limits != Limits::default() {
            r.limit_failures.push(format!(
                "{one_sided} frame(s) processed on one side only (see the list)"
            ));
        }
        Ok((
            r,
            ScorePairs {
                refer: refer_pairs,
                ma: ma_pairs,
            },
        ))
    }
}

/// Header of `frames.csv` ([`write_frames_csv`]).
pub const FRAMES_CSV_HEADER: &str = "record,source,image_sha256,status,device_refer,\
workstation_refer,device_refer_score,workstation_refer_score,device_mas,workstation_mas,\
matched_mas,max_score_diff,disagreement\n";

/// One line per record of the parts (in record order within each part) to `out`: the
/// per-frame comparison in a form a spreadsheet opens; `max_score_diff` marks a
/// disagreement as the report does.
pub fn write_frames_csv(parts: &[PathBuf], max_score_diff: Option<f64>, out: &Path) -> Result<()> {
    let mut w = std::io::BufWriter::new(
        File::create(out).with_context(|| format!("creating {}", out.display()))?,
    );
    let field = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
    w.write_all(FRAMES_CSV_HEADER.as_bytes())?;
    for part in parts {
        let file = File::open(part).with_context(|| format!("reading {}", part.display()))?;
        for line in BufReader::new(file).lines().skip(1) {
            let line = line.with_context(|| format!("reading {}", part.display()))?;
            let row: FrameRow = serde_json::from_str(&line)
                .with_context(|| format!("{}: a row does not parse", part.display()))?;
            writeln!(
                w,
                "{},{},{},{},{},{},{},{},{},{},{},{:.3e},{}",
                row.record,
                field(&row.source),
                row.image_sha256,
                field(&row.status),
                row.device_refer,
                row.workstation_refer
                    .map(|b| b.to_string())
                    .unwrap_or_default(),
                opt(row.device_refer_score),
                opt(row.workstation_refer_score),
                row.device_mas,
                row.workstation_mas,
                row.matched_mas,
                row.max_score_diff,
                field(&row.disagreements(max_score_diff).join("; "))
            )
            .with_context(|| format!("writing {}", out.display()))?;
        }
    }
    w.flush()
        .with_context(|| format!("writing {}", out.display()))
}

/// Writes `out/report.json` and `out/report.html` (self-contained, the Bland-Altman plots
/// embedded) for `report`; `pairs` are the plots' points.
pub fn write_report(out: &Path, report: &Report, pairs: &ScorePairs) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let html = out.join("report.html");
    std::fs::write(&html, html_report(report, pairs)?)
        .with_context(|| format!("writing {}", html.display()))?;
    Ok((json, html))
}

fn html_report(r: &Report, pairs: &ScorePairs) -> Result<String> {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let mut h = String::new();
    let verdict = if r.limit_failures.is_empty() {
        if r.limits == Limits::default() {
            "<p class=ok>No limits given (--min-kappa, --max-score-diff).</p>".to_string()
        } else {
            "<p class=ok><b>PASSED</b>: agreement within the limits.</p>".to_string()
        }
    } else {
        format!(
            "<p class=bad><b>FAILED</b>: {}</p>",
            esc(&r.limit_failures.join("; "))
        )
    };
    h.push_str(&format!(
        "<!DOCTYPE html><html><head><meta charset=utf-8><title>Field validation: {board}</title>\
         <style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}\
         th{{background:#eee}}td.l{{text-align:left}}.ok{{color:#1a7f37}}.bad{{color:#c62828}}</style></head><body>\
         <h1>Field validation: device vs workstation</h1>\
         <p>Bundle <code>{bundle}</code>, board <b>{board}</b>, model <b>{model}</b>, operating point {op}. \
         Device: tract (the records). Workstation: libtorch reference cascade, float, from the released training weights.</p>{verdict}",
        board = esc(&r.board),
        bundle = esc(&r.bundle),
        model = esc(&r.model_version),
        op = esc(&r.operating_point),
    ));
    let not: String = r
        .not_compared
        .iter()
        .map(|(k, v)| format!("{v} {}", esc(k)))
        .collect::<Vec<_>>()
        .join(", ");
    h.push_str(&format!(
        "<h2>Summary</h2><table>\
         <tr><th class=l>records</th><td>{}</td></tr>\
         <tr><th class=l>frames compared</th><td>{}</td></tr>\
         <tr><th class=l>not compared</th><td>{}</td></tr>\
         <tr><th class=l>failed on the device / workstation</th><td>{} / {}</td></tr>\
         <tr><th class=l>refer agreement</th><td>{:.4}</td></tr>\
         <tr><th class=l>Cohen's kappa (refer)</th><td>{:.4}</td></tr>\
         <tr><th class=l>MAs device / workstation / matched (&le; {MATCH_RADIUS} px)</th><td>{} / {} / {}</td></tr>\
         <tr><th class=l>MA match rate</th><td>{:.4}</td></tr>\
         <tr><th class=l>detections matched / unmatched</th><td>{} / {}</td></tr>\
         <tr><th class=l>detection score |difference| max / mean</th><td>{:.2e} / {:.2e}</td></tr>\
         <tr><th class=l>refer_score |difference| max / mean</th><td>{:.2e} / {:.2e}</td></tr>\
         <tr><th class=l>workstation time per frame</th><td>{:.0} ms</td></tr></table>",
        r.records,
        r.frames_compared,
        if not.is_empty() { not } else { "0".into() },
        r.device_failed,
        r.workstation_failed,
        r.refer_agreement,
        r.kappa,
        r.device_mas,
        r.workstation_mas,
        r.matched_mas,
        r.ma_match_rate,
        r.matched_detections,
        r.unmatched_detections,
        r.max_score_diff,
        r.mean_score_diff,
        r.refer_score.max_abs,
        r.refer_score.mean_abs,
        r.workstation_ms_per_frame,
    ));
    let c = r.refer_confusion;
    h.push_str(&format!(
        "<h2>Refer decisions</h2><table><tr><th></th><th>workstation: no</th><th>workstation: refer</th></tr>\
         <tr><th>device: no</th><td>{}</td><td>{}</td></tr>\
         <tr><th>device: refer</th><td>{}</td><td>{}</td></tr></table>",
        c[0][0], c[0][1], c[1][0], c[1][1]
    ));
    h.push_str("<h2>Bland-Altman</h2>");
    for (pairs, what, stats) in [
        (&pairs.refer, "refer_score", &r.refer_score),
        (&pairs.ma, "MA scores (matched MAs)", &r.ma_scores),
    ] {
        if pairs.is_empty() {
            h.push_str(&format!("<p>{what}: no pairs.</p>"));
            continue;
        }
        let png = bland_altman_png(pairs, what, "device", "workstation")?;
        h.push_str(&format!(
            "<p>{what}: bias {:+.2e}, sd {:.2e}, 95% limits of agreement {:+.2e} .. {:+.2e} ({} pairs)</p>\
             <img alt=\"Bland-Altman plot of {what}\" width=900 src=\"data:image/png;base64,{}\">",
            stats.bias,
            stats.sd,
            stats.lower,
            stats.upper,
            stats.pairs,
            base64(&png)
        ));
    }
    if let Some(t) = &r.truth {
        h.push_str(&format!(
            "<h2>Against the clinicians' marks</h2><p>{} frames, {} lesions; sensitivity at each FP/image \
             (lesion-level FROC, 5-px rule)</p><table><tr><th></th>",
            t.frames, t.lesions
        ));
        for (rate, _) in &t.device.sensitivities {
            h.push_str(&format!("<th>{rate}</th>"));
        }
        h.push_str("<th>CPM</th></tr>");
        for (name, side) in [("device", &t.device), ("workstation", &t.workstation)] {
            h.push_str(&format!("<tr><th>{name}</th>"));
            for (_, s) in &side.sensitivities {
                h.push_str(&format!("<td>{s:.3}</td>"));
            }
            h.push_str(&format!("<td><b>{:.3}</b></td></tr>", side.cpm));
        }
        h.push_str("</table>");
    }
    h.push_str(&format!(
        "<h2>Frames that disagree ({})</h2>",
        r.disagreeing_frames.len()
    ));
    if !r.disagreeing_frames.is_empty() {
        h.push_str("<table><tr><th>record</th><th>source</th><th>SHA-256</th><th>why</th></tr>");
        for d in &r.disagreeing_frames {
            h.push_str(&format!(
                "<tr><td>{}</td><td class=l>{}</td><td class=l><code>{}</code></td><td class=l>{}</td></tr>",
                d.record,
                esc(&d.source),
                esc(&d.image_sha256[..d.image_sha256.len().min(16)]),
                esc(&d.reasons.join("; "))
            ));
        }
        h.push_str("</table>");
    }
    h.push_str("</body></html>\n");
    Ok(h)
}

/// Standard base64 (RFC 4648, padded), for the embedded plots.
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
    }

    #[test]
    fn shards_split_the_records_once() {
        let shards: Vec<Shard> = (1..=3).map(|k| format!("{k}/3").parse().unwrap()).collect();
        for i in 0..20 {
            assert_eq!(shards.iter().filter(|s| s.holds(i)).count(), 1);
        }
        for bad in ["0/3", "4/3", "1/0", "x", "1-3"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn detections_pair_up_closest_first_within_two_pixels() {
        let d = |x, y, score| Detection { x, y, score };
        let a = [d(10.0, 10.0, 0.9), d(11.5, 10.0, 0.8), d(50.0, 50.0, 0.2)];
        let b = [d(11.0, 10.0, 0.85), d(53.0, 50.0, 0.2)];
        // (1, 0) is closer (0.5 px) than (0, 0) (1 px); (2, 1) is 3 px apart.
        assert_eq!(match_detections(&a, &b, 0.0), vec![(1, 0)]);
        // At 0.85 the closer a[1] (0.8) no longer counts: a[0] pairs with b[0].
        assert_eq!(match_detections(&a, &b, 0.85), vec![(0, 0)]);
        assert_eq!(match_detections(&a, &b, 0.95), Vec::<(usize, usize)>::new());
    }
}
