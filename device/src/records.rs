//! Crash-safe, append-only log of per-frame results.
//!
//! Every processed frame (or frame that failed) appends one [`Record`]. The device may lose
//! power at any moment, so the file is built to survive that:
//!
//! * **Header**: the file starts with [`MAGIC`] (`b"MAREC"`) and one format-version byte
//!   ([`FORMAT_VERSION`]), written and synced when the file is created. A file with another
//!   magic or version is refused, with its name in the error, rather than misread.
//! * **Frames**: each record is `COBS(postcard(record) || CRC32) 0x00`: the postcard payload
//!   and its CRC (little-endian) are COBS-encoded together, so the only zero byte of a frame is
//!   its terminator. A reader can always find the next frame boundary, whatever a damaged frame
//!   contains. The CRC is CRC-32/ISO-HDLC ([`crc::CRC_32_ISO_HDLC`], the zlib/PNG/Ethernet CRC,
//!   so `zlib.crc32` can check a frame by hand).
//! * **Appends** are one `write` on a file opened in append mode followed by `fdatasync`; only
//!   after that returns is a result reported as saved. A failed write is cut back off the file.
//! * **Reading** splits on 0x00. A final chunk without its terminator is a torn write (power
//!   lost mid-append, never confirmed): [`RecordLog::open`] truncates it, [`read_all`] ignores
//!   it. A complete frame whose COBS, CRC or decoding fails is skipped and reported, never
//!   returned. Empty chunks (a lone 0x00) carry nothing and are skipped silently: the writer
//!   emits one as a resynchronisation marker after a failed append it could not cut off.
//!
//! **Changing [`Record`]**: postcard is positional (no field names on disk), so fields may only
//! be *appended* at the end of the struct, never removed, reordered or retyped, and every
//! layout change must bump [`FORMAT_VERSION`] and keep a decoder for the previous layouts, so
//! old logs stay readable.
//!
//! **Older logs**: version 1 (no referral fields) and version 2 (no `frame_file`) are read by
//! [`read_all`] and [`read_each`] (the missing fields empty). [`RecordLog::open`] never appends
//! to them, since one file has one layout: it renames the old log aside (`records.log` ->
//! `records.log.v1` or `.v2`, said in the
//! [`OpenReport`]) and starts a new one, so a device updated in the field keeps running and
//! keeps every old record. A version newer than this build's is refused, with the file's name.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use crc::{CRC_32_ISO_HDLC, Crc};
use postcard::ser_flavors::crc::CrcModifier;
use postcard::ser_flavors::{AllocVec, Cobs};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use ma_core::detection::Detection;
use ma_core::referral::AttentionBox;

/// First bytes of every records log.
pub const MAGIC: &[u8; 5] = b"MAREC";
/// Layout version of [`Record`] in this build; bump it whenever a field is appended.
/// Version 2 appended `refer_score` and `attention_boxes`, version 3 `frame_file`.
pub const FORMAT_VERSION: u8 = 3;
/// Older layouts this build still reads (see [`RecordV1`], [`RecordV2`]).
pub const READABLE_VERSIONS: [u8; 3] = [1, 2, 3];
/// Length of the file header: [`MAGIC`] then the version byte.
pub const HEADER_LEN: usize = MAGIC.len() + 1;
/// Largest encoded frame accepted (writer) or decoded (reader): bounds the memory a damaged
/// file without zero bytes can make a reader use. A record is a few KiB in practice.
pub const MAX_FRAME_LEN: usize = 16 << 20;

/// CRC-32/ISO-HDLC (poly 0x04C11DB7 reflected, init/xorout 0xFFFFFFFF), stored little-endian.
pub static CRC32: Crc<u32> = Crc::<u32>::new(&CRC_32_ISO_HDLC);

/// One processed (or failed) frame.
///
/// On disk the fields are positional (postcard): only ever append new fields at the end and
/// bump [`FORMAT_VERSION`] (see the module docs). For a frame that failed, `error` is set and
/// fields that could not be known are zero or empty.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Wall-clock time the frame was taken, milliseconds since the Unix epoch (UTC).
    pub time_unix_ms: i64,
    /// Frame number within the run, from the source.
    pub frame: u64,
    /// Where the frame came from: a file name, or `camera:/dev/video0` and the like.
    pub source: String,
    /// SHA-256 that ties the result to the exact image: of the file's bytes for a frame
    /// replayed from a folder; of the decoded RGB8 pixels (rows top to bottom, 3 bytes per
    /// pixel, no header; `run_loop::pixel_hash`) for camera and synthetic frames, whose raw
    /// bytes do not reach the device loop. All zero for a source error (no image).
    pub image_sha256: ImageHash,
    pub width: u32,
    pub height: u32,
    /// Candidates in original-image pixel coordinates, best first.
    pub detections: Vec<RecordDetection>,
    /// Whether the frame was flagged for referral to an ophthalmologist.
    pub refer: bool,
    /// Number of MAs at the board's operating point.
    pub ma_count: u32,
    /// Version of the model bundle that produced the detections.
    pub model_version: String,
    /// Board config name (`BoardConfig::name`).
    pub board: String,
    /// Processing time of the frame (decode to result).
    pub elapsed_ms: f32,
    /// Why the frame failed; `None` for a processed frame.
    pub error: Option<String>,
    /// The referral network's score (0..1, `refer_score` of `detect`); `None` without a
    /// referral network, for a failed frame and in version 1 logs.
    pub refer_score: Option<f64>,
    /// The referral network's strongest attention cells, strongest first, in original-image
    /// pixel coordinates (what made the score); empty when `refer_score` is `None`.
    pub attention_boxes: Vec<RecordBox>,
    /// The frame's file in the board's frames archive (`<image_sha256>.<ext>`, see
    /// [`crate::archive`]), on disk before this record was written; `None` without an
    /// archive, when keeping it failed, for a source error and in version 1 and 2 logs.
    /// It may have been evicted since (frames budget).
    pub frame_file: Option<String>,
}

/// The layout of version 2 logs: [`Record`] without `frame_file`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RecordV2 {
    time_unix_ms: i64,
    frame: u64,
    source: String,
    image_sha256: ImageHash,
    width: u32,
    height: u32,
    detections: Vec<RecordDetection>,
    refer: bool,
    ma_count: u32,
    model_version: String,
    board: String,
    elapsed_ms: f32,
    error: Option<String>,
    refer_score: Option<f64>,
    attention_boxes: Vec<RecordBox>,
}

impl From<RecordV2> for Record {
    fn from(r: RecordV2) -> Self {
        Record {
            time_unix_ms: r.time_unix_ms,
            frame: r.frame,
            source: r.source,
            image_sha256: r.image_sha256,
            width: r.width,
            height: r.height,
            detections: r.detections,
            refer: r.refer,
            ma_count: r.ma_count,
            model_version: r.model_version,
            board: r.board,
            elapsed_ms: r.elapsed_ms,
            error: r.error,
            refer_score: r.refer_score,
            attention_boxes: r.attention_boxes,
            frame_file: None,
        }
    }
}

/// The layout of version 1 logs: [`Record`] without the referral fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RecordV1 {
    time_unix_ms: i64,
    frame: u64,
    source: String,
    image_sha256: ImageHash,
    width: u32,
    height: u32,
    detections: Vec<RecordDetection>,
    refer: bool,
    ma_count: u32,
    model_version: String,
    board: String,
    elapsed_ms: f32,
    error: Option<String>,
}

impl From<RecordV1> for Record {
    fn from(r: RecordV1) -> Self {
        RecordV2 {
            time_unix_ms: r.time_unix_ms,
            frame: r.frame,
            source: r.source,
            image_sha256: r.image_sha256,
            width: r.width,
            height: r.height,
            detections: r.detections,
            refer: r.refer,
            ma_count: r.ma_count,
            model_version: r.model_version,
            board: r.board,
            elapsed_ms: r.elapsed_ms,
            error: r.error,
            refer_score: None,
            attention_boxes: Vec::new(),
        }
        .into()
    }
}

/// One attention box of a [`Record`]; its own type for the reason [`RecordDetection`] is.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordBox {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
    /// The attention value of the cell (0..1).
    pub weight: f64,
}

impl From<AttentionBox> for RecordBox {
    fn from(b: AttentionBox) -> Self {
        Self {
            x0: b.x0,
            y0: b.y0,
            x1: b.x1,
            y1: b.y1,
            weight: b.weight,
        }
    }
}

/// One candidate in a [`Record`]. Its own type rather than [`Detection`] so that adding a field
/// to the detection output format cannot silently change the log's binary layout.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordDetection {
    pub x: f64,
    pub y: f64,
    pub score: f64,
}

impl From<Detection> for RecordDetection {
    fn from(d: Detection) -> Self {
        Self {
            x: d.x,
            y: d.y,
            score: d.score,
        }
    }
}

impl From<RecordDetection> for Detection {
    fn from(d: RecordDetection) -> Self {
        Detection {
            x: d.x,
            y: d.y,
            score: d.score,
        }
    }
}

/// A SHA-256 digest: 32 raw bytes in the log, a lowercase hex string in JSON.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ImageHash(pub [u8; 32]);

impl ImageHash {
    /// The SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(ma_core::digest::sha256(bytes))
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Result<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            bail!("a SHA-256 needs 64 hex digits, got {} characters", s.len());
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let digit = |c: u8| {
                (c as char)
                    .to_digit(16)
                    .ok_or_else(|| anyhow!("{:?} is not a hex digit", c as char))
            };
            out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for ImageHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ImageHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageHash({self})")
    }
}

impl Serialize for ImageHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for ImageHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let s = String::deserialize(deserializer)?;
            ImageHash::from_hex(&s).map_err(serde::de::Error::custom)
        } else {
            Ok(Self(<[u8; 32]>::deserialize(deserializer)?))
        }
    }
}

/// Milliseconds since the Unix epoch now, for [`Record::time_unix_ms`].
pub fn now_unix_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        // A clock set before 1970 (RTC battery flat): keep the sign rather than fail.
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// A complete frame that was skipped because it could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorruptFrame {
    /// 0-based number of the frame among all complete frames of the file (valid or not).
    pub frame: u64,
    /// Byte offset of the frame's first byte in the file.
    pub offset: u64,
    /// Length of the frame without its terminator.
    pub len: u64,
    pub reason: String,
}

/// Corrupt frames described one by one in an [`OpenReport`]'s text; the rest are counted.
const REPORT_EXAMPLES: usize = 3;

/// What opening or reading a log found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Records that decoded.
    pub records_ok: u64,
    /// Complete frames that were skipped.
    pub corrupt: Vec<CorruptFrame>,
    /// Bytes of an unterminated final frame: cut off by [`RecordLog::open`], ignored by
    /// [`read_all`]. Also counts a partial header left by a crash while creating the file.
    pub torn_bytes: u64,
    /// The file was created (or was empty) and a fresh header was written.
    pub created: bool,
    /// An older-version log found at the path was renamed to this file (every record kept,
    /// still readable) and a new log started in its place.
    pub moved_aside: Option<(u8, PathBuf)>,
}

impl OpenReport {
    pub fn corrupt_skipped(&self) -> u64 {
        self.corrupt.len() as u64
    }

    /// Nothing was skipped or cut off.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.torn_bytes == 0
    }
}

impl fmt::Display for OpenReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} records ok", self.records_ok)?;
        if self.created {
            write!(f, " (new log)")?;
        }
        if let Some((version, to)) = &self.moved_aside {
            write!(
                f,
                "; the format version {version} log there was moved to {} (its records are \
                 kept; `ma-device records export` reads it)",
                to.display()
            )?;
        }
        if !self.corrupt.is_empty() {
            write!(f, ", {} corrupt frames skipped", self.corrupt.len())?;
            // A few examples and the byte range, not every frame: a badly damaged log
            // printed 12 MB on one line at every start of `run`.
            for c in self.corrupt.iter().take(REPORT_EXAMPLES) {
                write!(
                    f,
                    "; frame {} at byte {} ({} bytes): {}",
                    c.frame, c.offset, c.len, c.reason
                )?;
            }
            if let (Some(more), Some(first), Some(last)) = (
                self.corrupt.len().checked_sub(REPORT_EXAMPLES + 1),
                self.corrupt.first(),
                self.corrupt.last(),
            ) {
                write!(
                    f,
                    "; and {} more (corrupt frames lie between bytes {} and {})",
                    more + 1,
                    first.offset,
                    last.offset + last.len
                )?;
            }
        }
        if self.torn_bytes > 0 {
            write!(f, ", {} bytes of a torn final write", self.torn_bytes)?;
        }
        Ok(())
    }
}

/// The writer side of a records log. Holds an exclusive lock on the file, so a second device
/// process cannot interleave records with this one.
#[derive(Debug)]
pub struct RecordLog {
    file: File,
    path: PathBuf,
    state: AppendState,
    next_index: u64,
}

#[derive(Debug, Clone, Copy)]
struct AppendState {
    /// File length after the last confirmed frame.
    len: u64,
    /// A failed append could not be cut off: the file may end in a partial frame, so the next
    /// frame starts with a 0x00 to close it.
    dirty: bool,
}

impl RecordLog {
    /// Opens `path` for appending, creating it (and its parent folders) with a header if it is
    /// missing or empty. An existing log is scanned: a torn final frame is truncated away and
    /// reported, corrupt frames are counted and reported (they stay in the file; readers skip
    /// them). Fails on a file that is not a records log of [`FORMAT_VERSION`], or that another
    /// process has open for writing.
    pub fn open(path: impl AsRef<Path>) -> Result<(RecordLog, OpenReport)> {
        let path = path.as_ref();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).with_context(|| {
                format!("creating the folder of records log {}", path.display())
            })?;
        }
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("opening records log {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => bail!(
                "records log {} is in use by another process (locked)",
                path.display()
            ),
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking records log {}", path.display()));
            }
        }

        let mut report = OpenReport::default();
        let file_len = file
            .metadata()
            .with_context(|| format!("reading the size of records log {}", path.display()))?
            .len();
        let header = read_header(&file, file_len, path)?;
        if let Header::Valid(version) = header
            && version != FORMAT_VERSION
        {
            // Rename while holding the lock, so no other writer can start on the old file.
            let aside = move_aside(path, version)?;
            drop(file);
            let (log, mut report) = RecordLog::open(path)?;
            report.moved_aside = Some((version, aside));
            return Ok((log, report));
        }
        if header != Header::Valid(FORMAT_VERSION) {
            if let Header::Torn(n) = header {
                report.torn_bytes = n;
            }
            write_fresh_header(&file, path, !existed)?;
            report.created = true;
            let log = RecordLog {
                file,
                path: path.to_path_buf(),
                state: AppendState {
                    len: HEADER_LEN as u64,
                    dirty: false,
                },
                next_index: 0,
            };
            return Ok((log, report));
        }

        let mut reader = BufReader::new(&file);
        reader
            .seek(SeekFrom::Start(HEADER_LEN as u64))
            .with_context(|| format!("seeking in records log {}", path.display()))?;
        let complete_len = scan(&mut reader, path, FORMAT_VERSION, &mut report, &mut |_| {
            Ok(())
        })?;
        drop(reader);
        if report.torn_bytes > 0 {
            file.set_len(complete_len)
                .and_then(|()| file.sync_data())
                .with_context(|| {
                    format!(
                        "cutting a torn final record ({} bytes) off records log {}",
                        report.torn_bytes,
                        path.display()
                    )
                })?;
        }
        let log = RecordLog {
            file,
            path: path.to_path_buf(),
            state: AppendState {
                len: complete_len,
                dirty: false,
            },
            next_index: report.records_ok,
        };
        Ok((log, report))
    }

    /// Appends `record` and waits until it is on disk (`fdatasync`). Returns its index: the
    /// number of valid records before it, i.e. its position in [`read_all`]'s list. On error
    /// (disk full, I/O error) the record is not saved and the file is cut back to its previous
    /// length, so later records stay readable.
    pub fn append(&mut self, record: &Record) -> Result<u64> {
        let frame = encode_frame(record)
            .with_context(|| format!("encoding a record for {}", self.path.display()))?;
        append_frame(&mut self.file, &mut self.state, &frame, &self.path)?;
        let index = self.next_index;
        self.next_index += 1;
        Ok(index)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Index the next appended record will get (valid records in the file so far).
    pub fn next_index(&self) -> u64 {
        self.next_index
    }
}

/// Reads every valid record of the log at `path`, without modifying it (safe while a device
/// process is appending: an in-progress final write shows up as torn bytes).
pub fn read_all(path: impl AsRef<Path>) -> Result<(Vec<Record>, OpenReport)> {
    let mut records = Vec::new();
    let report = read_each(path, |r| {
        records.push(r);
        Ok(())
    })?;
    Ok((records, report))
}

/// Like [`read_all`], but hands each record to `f` as it is read, so exporting a large log
/// does not hold it in memory. An error from `f` stops the reading and is returned.
pub fn read_each(
    path: impl AsRef<Path>,
    mut f: impl FnMut(Record) -> Result<()>,
) -> Result<OpenReport> {
    let path = path.as_ref();
    let file =
        File::open(path).with_context(|| format!("opening records log {}", path.display()))?;
    let file_len = file
        .metadata()
        .with_context(|| format!("reading the size of records log {}", path.display()))?
        .len();
    let mut report = OpenReport::default();
    let version = match read_header(&file, file_len, path)? {
        Header::Valid(version) => version,
        Header::Empty => return Ok(report),
        Header::Torn(n) => {
            report.torn_bytes = n;
            return Ok(report);
        }
    };
    let mut reader = BufReader::new(file);
    reader
        .seek(SeekFrom::Start(HEADER_LEN as u64))
        .with_context(|| format!("seeking in records log {}", path.display()))?;
    scan(&mut reader, path, version, &mut report, &mut f)?;
    Ok(report)
}

/// Encodes one frame: `COBS(postcard(record) || CRC32 little-endian)` plus the 0x00 terminator.
/// The CRC flavor wraps the COBS flavor, so the CRC bytes go through COBS too.
pub fn encode_frame(record: &Record) -> Result<Vec<u8>> {
    let frame = encode_any(record)?;
    if frame.len() > MAX_FRAME_LEN {
        bail!(
            "record of {} bytes is larger than the {MAX_FRAME_LEN}-byte limit ({} detections)",
            frame.len(),
            record.detections.len()
        );
    }
    Ok(frame)
}

/// The frame encoding of any layout (tests write older versions with it).
fn encode_any<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let flavor = CrcModifier::new(Cobs::try_new(AllocVec::new())?, CRC32.digest());
    Ok(postcard::serialize_with_flavor(value, flavor)?)
}

/// Decodes one frame's bytes (without the 0x00 terminator) into a record, or says why not.
pub fn decode_frame(frame: &[u8]) -> std::result::Result<Record, String> {
    decode_frame_version(frame, FORMAT_VERSION)
}

/// [`decode_frame`] for a log of format `version` (one of [`READABLE_VERSIONS`]).
pub fn decode_frame_version(frame: &[u8], version: u8) -> std::result::Result<Record, String> {
    let decoded = cobs_decode(frame).ok_or("bad COBS encoding")?;
    if decoded.len() < 4 {
        return Err(format!("{} bytes is too short for a CRC", decoded.len()));
    }
    let (payload, stored) = decoded.split_at(decoded.len() - 4);
    let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
    let computed = CRC32.checksum(payload);
    if stored != computed {
        return Err(format!(
            "CRC mismatch (stored {stored:08x}, computed {computed:08x})"
        ));
    }
    // The CRC was checked above only to tell damage apart from a layout mismatch; this checks
    // it again while decoding.
    let taken = match version {
        1 => postcard::take_from_bytes_crc32::<RecordV1>(&decoded, CRC32.digest())
            .map(|(r, rest)| (Record::from(r), rest)),
        2 => postcard::take_from_bytes_crc32::<RecordV2>(&decoded, CRC32.digest())
            .map(|(r, rest)| (Record::from(r), rest)),
        FORMAT_VERSION => postcard::take_from_bytes_crc32::<Record>(&decoded, CRC32.digest()),
        other => return Err(format!("format version {other} is not readable")),
    };
    match taken {
        Ok((record, [])) => Ok(record),
        Ok((_, rest)) => Err(format!(
            "{} bytes left after the record (written by another format version?)",
            rest.len()
        )),
        Err(e) => Err(format!(
            "CRC ok but the record does not decode (another format version?): {e}"
        )),
    }
}

/// Plain COBS decoding (postcard does not expose its `cobs` dependency). `None` on a malformed
/// encoding: a zero byte, or a block running past the end.
fn cobs_decode(src: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(src.len());
    let mut i = 0;
    while i < src.len() {
        let code = src[i] as usize;
        if code == 0 {
            return None;
        }
        let end = i + code;
        if end > src.len() {
            return None;
        }
        let block = &src[i + 1..end];
        if block.contains(&0) {
            return None;
        }
        out.extend_from_slice(block);
        i = end;
        if code != 0xFF && i < src.len() {
            out.push(0);
        }
    }
    Some(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Header {
    /// A complete header of a version this build reads.
    Valid(u8),
    /// Zero-length file.
    Empty,
    /// A strict prefix of a valid header: a crash while the file was being created.
    Torn(u64),
}

fn expected_header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..MAGIC.len()].copy_from_slice(MAGIC);
    h[MAGIC.len()] = FORMAT_VERSION;
    h
}

fn read_header(mut file: &File, file_len: u64, path: &Path) -> Result<Header> {
    if file_len == 0 {
        return Ok(Header::Empty);
    }
    let n = file_len.min(HEADER_LEN as u64) as usize;
    let mut buf = [0u8; HEADER_LEN];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut buf[..n]))
        .with_context(|| format!("reading the header of records log {}", path.display()))?;
    let got = &buf[..n];
    let magic_len = n.min(MAGIC.len());
    if got[..magic_len] != MAGIC[..magic_len] {
        bail!(
            "{} is not an ma-device records log (starts with {:?}, expected {:?})",
            path.display(),
            String::from_utf8_lossy(&got[..magic_len]),
            String::from_utf8_lossy(MAGIC)
        );
    }
    if n < HEADER_LEN {
        return Ok(Header::Torn(n as u64));
    }
    let version = got[MAGIC.len()];
    if !READABLE_VERSIONS.contains(&version) {
        bail!(
            "records log {} has format version {version}, this build reads versions {:?} and \
             writes version {FORMAT_VERSION}; move the file aside (a matching build can still \
             export it)",
            path.display(),
            READABLE_VERSIONS,
        );
    }
    Ok(Header::Valid(version))
}

/// Renames the version-`version` log at `path` to `<name>.v<version>` (or `.v<version>.2`,
/// `.3`, ... if taken) and makes the rename durable; returns the new path.
fn move_aside(path: &Path, version: u8) -> Result<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "records.log".into());
    let mut aside = path.with_file_name(format!("{name}.v{version}"));
    let mut k = 1;
    while aside.exists() {
        k += 1;
        aside = path.with_file_name(format!("{name}.v{version}.{k}"));
    }
    fs::rename(path, &aside).with_context(|| {
        format!(
            "records log {} has format version {version} (this build writes {FORMAT_VERSION}); \
             could not move it aside to {}",
            path.display(),
            aside.display()
        )
    })?;
    sync_parent_dir(path)?;
    Ok(aside)
}

/// Replaces whatever is in `file` (nothing, or a partial header) with a header and makes it
/// durable, including the directory entry of a new file.
fn write_fresh_header(mut file: &File, path: &Path, new_file: bool) -> Result<()> {
    file.set_len(0)
        .and_then(|()| file.write_all(&expected_header()))
        .and_then(|()| file.sync_data())
        .with_context(|| format!("writing the header of records log {}", path.display()))?;
    if new_file {
        sync_parent_dir(path)?;
    }
    Ok(())
}

/// Makes a new file's directory entry durable (fsync on the folder), so a power loss right
/// after creation cannot lose the whole log.
fn sync_parent_dir(path: &Path) -> Result<()> {
    let parent = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => p,
        None => Path::new("."),
    };
    ma_core::durable::sync_dir(parent)
        .with_context(|| format!("syncing the folder of records log {}", path.display()))
}

/// Reads frames from `reader` (positioned just after the header) to the end. Valid records go
/// to `on_record`; corrupt and torn frames go into `report`. Returns the file length up to
/// the end of the last complete frame.
fn scan(
    reader: &mut impl BufRead,
    path: &Path,
    version: u8,
    report: &mut OpenReport,
    on_record: &mut dyn FnMut(Record) -> Result<()>,
) -> Result<u64> {
    let mut chunk: Vec<u8> = Vec::new();
    // True length of the current chunk; may exceed `chunk.len()` for an oversized chunk,
    // whose bytes are not kept.
    let mut chunk_len: u64 = 0;
    let mut chunk_start = HEADER_LEN as u64;
    let mut frame_no = 0u64;
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("reading records log {}", path.display()));
            }
        };
        if buf.is_empty() {
            break;
        }
        let (take, terminated) = match buf.iter().position(|&b| b == 0) {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if chunk_len + (take as u64) <= MAX_FRAME_LEN as u64 {
            chunk.extend_from_slice(&buf[..take]);
        } else {
            chunk = Vec::new();
        }
        chunk_len += take as u64;
        reader.consume(take + usize::from(terminated));
        if !terminated {
            continue;
        }
        if chunk_len > 0 {
            let outcome = if chunk_len > MAX_FRAME_LEN as u64 {
                Err(format!("frame longer than the {MAX_FRAME_LEN}-byte limit"))
            } else {
                decode_frame_version(&chunk, version)
            };
            match outcome {
                Ok(record) => {
                    report.records_ok += 1;
                    on_record(record)?;
                }
                Err(reason) => report.corrupt.push(CorruptFrame {
                    frame: frame_no,
                    offset: chunk_start,
                    len: chunk_len,
                    reason,
                }),
            }
            frame_no += 1;
        }
        chunk_start += chunk_len + 1;
        chunk.clear();
        chunk_len = 0;
    }
    report.torn_bytes += chunk_len;
    Ok(chunk_start)
}

/// The file operations an append needs; a trait so tests can fail them on purpose.
trait AppendTarget {
    /// One `write` call (no retry loop), so an append is a single syscall on an O_APPEND file.
    fn write_once(&mut self, buf: &[u8]) -> io::Result<usize>;
    fn sync_data(&mut self) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    fn current_len(&mut self) -> io::Result<u64>;
}

impl AppendTarget for File {
    fn write_once(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    fn current_len(&mut self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

fn append_frame(
    target: &mut impl AppendTarget,
    state: &mut AppendState,
    frame: &[u8],
    path: &Path,
) -> Result<()> {
    let resync;
    let bytes = if state.dirty {
        if let Ok(len) = target.current_len() {
            state.len = len;
        }
        resync = [&[0u8][..], frame].concat();
        &resync[..]
    } else {
        frame
    };
    let start = state.len;
    let failure = match target.write_once(bytes) {
        Ok(n) if n == bytes.len() => match target.sync_data() {
            Ok(()) => None,
            Err(e) => Some(anyhow::Error::new(e).context(format!(
                "syncing records log {} (record not saved)",
                path.display()
            ))),
        },
        Ok(n) => Some(anyhow!(
            "short write to records log {}: {n} of {} bytes (disk full?); record not saved",
            path.display(),
            bytes.len()
        )),
        Err(e) => Some(anyhow::Error::new(e).context(format!(
            "writing a record to records log {} (record not saved)",
            path.display()
        ))),
    };
    let Some(err) = failure else {
        state.len = start + bytes.len() as u64;
        state.dirty = false;
        return Ok(());
    };
    // Cut off whatever part of the frame reached the file, so it cannot merge with the next.
    match target.set_len(start).and_then(|()| target.sync_data()) {
        Ok(()) => Err(err),
        Err(cut) => {
            state.dirty = true;
            Err(err.context(format!(
                "could not cut the partial record off {} either ({cut}); the next record starts \
                 with a resync byte and readers skip the damaged one",
                path.display()
            )))
        }
    }
}

/// Writes one JSON object per line (the [`Record`] fields; `image_sha256` as hex).
pub fn to_jsonl(records: &[Record], mut writer: impl Write) -> Result<()> {
    for r in records {
        serde_json::to_writer(&mut writer, r).context("writing a JSONL record")?;
        writer.write_all(b"\n").context("writing a JSONL record")?;
    }
    writer.flush().context("writing JSONL records")
}

/// The CSV header row of [`to_csv`] (with its line end). Columns are only ever appended.
pub const CSV_HEADER: &str = "time,frame,source,sha256,width,height,ma_count,refer,\
model_version,board,elapsed_ms,error,detections,refer_score,attention_boxes,frame_file\r\n";

/// Writes a header row then one row per record (RFC 4180: CRLF line ends, fields with a comma,
/// quote or line break quoted, quotes doubled). `time` is ISO-8601 UTC; `detections` is
/// `x:y:score;...` (2, 2 and 4 decimals); `refer_score` has 4 decimals (empty without one);
/// `attention_boxes` is `x0:y0:x1:y1:weight;...` (1 and 4 decimals); `frame_file` is the
/// frame's file in the archive (empty without one); JSONL has full precision.
pub fn to_csv(records: &[Record], mut writer: impl Write) -> Result<()> {
    writer
        .write_all(CSV_HEADER.as_bytes())
        .context("writing the CSV header")?;
    for r in records {
        writer
            .write_all(csv_row(r).as_bytes())
            .context("writing a CSV row")?;
    }
    writer.flush().context("writing CSV rows")
}

/// One CSV row of [`to_csv`], with its CRLF line end.
pub fn csv_row(r: &Record) -> String {
    let detections = r
        .detections
        .iter()
        .map(|d| format!("{:.2}:{:.2}:{:.4}", d.x, d.y, d.score))
        .collect::<Vec<_>>()
        .join(";");
    let boxes = r
        .attention_boxes
        .iter()
        .map(|b| {
            format!(
                "{:.1}:{:.1}:{:.1}:{:.1}:{:.4}",
                b.x0, b.y0, b.x1, b.y1, b.weight
            )
        })
        .collect::<Vec<_>>()
        .join(";");
    let fields = [
        format_time_utc(r.time_unix_ms),
        r.frame.to_string(),
        r.source.clone(),
        r.image_sha256.to_string(),
        r.width.to_string(),
        r.height.to_string(),
        r.ma_count.to_string(),
        r.refer.to_string(),
        r.model_version.clone(),
        r.board.clone(),
        format!("{:.1}", r.elapsed_ms),
        r.error.clone().unwrap_or_default(),
        detections,
        r.refer_score.map(|s| format!("{s:.4}")).unwrap_or_default(),
        boxes,
        r.frame_file.clone().unwrap_or_default(),
    ];
    let mut row = fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",");
    row.push_str("\r\n");
    row
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One human-readable line per record (numbered from 0 as in [`RecordLog::append`]'s index),
/// each ending in a newline.
pub fn list_summary(records: &[Record]) -> String {
    let mut out = String::new();
    for (i, r) in records.iter().enumerate() {
        let mut line = format!(
            "#{i} {} frame {} {} {}x{}",
            format_time_utc(r.time_unix_ms),
            r.frame,
            // One line per record, whatever bytes a file name held.
            crate::console::escape_controls(&r.source),
            r.width,
            r.height
        );
        match &r.error {
            Some(e) => line.push_str(&format!(" FAILED: {}", e.replace(['\n', '\r'], " "))),
            None => {
                line.push_str(&format!(
                    " MAs {}{} ({} candidates)",
                    r.ma_count,
                    if r.refer { " REFER" } else { "" },
                    r.detections.len()
                ));
                if let Some(score) = r.refer_score {
                    line.push_str(&format!(
                        " refer_score {score:.2} ({} boxes)",
                        r.attention_boxes.len()
                    ));
                }
            }
        }
        line.push_str(&format!(
            " {:.0} ms model {} board {} sha256 {}",
            r.elapsed_ms,
            r.model_version,
            r.board,
            &r.image_sha256.to_string()[..12]
        ));
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `2024-05-01T12:34:56.789Z` for milliseconds since the Unix epoch (proleptic Gregorian,
/// UTC), without a date-time dependency.
pub fn format_time_utc(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Milliseconds since the Unix epoch of a UTC time written `YYYY-MM-DD`,
/// `YYYY-MM-DDTHH:MM`, `YYYY-MM-DDTHH:MM:SS` (a space may replace the `T`, a final `Z` is
/// accepted), as `records export --since/--until` take it.
pub fn parse_time_utc(text: &str) -> Result<i64> {
    let bad = || {
        anyhow!(
            "cannot read the time {text:?}: expected YYYY-MM-DD, YYYY-MM-DDTHH:MM or \
             YYYY-MM-DDTHH:MM:SS (UTC)"
        )
    };
    let t = text.trim().trim_end_matches('Z');
    let (date, time) = match t.split_once(['T', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (t, None),
    };
    let num = |s: &str| -> Result<i64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse::<i64>().map_err(|_| bad())
    };
    let d: Vec<&str> = date.split('-').collect();
    let [y, m, day] = d[..] else {
        return Err(bad());
    };
    let (y, m, day) = (num(y)?, num(m)?, num(day)?);
    let (hh, mm, ss) = match time {
        None => (0, 0, 0),
        Some(t) => match t.split(':').collect::<Vec<_>>()[..] {
            [h, mi] => (num(h)?, num(mi)?, 0),
            [h, mi, s] => (num(h)?, num(mi)?, num(s)?),
            _ => return Err(bad()),
        },
    };
    let days_in_month = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if !(1..=days_in_month).contains(&day) || hh > 23 || mm > 59 || ss > 59 {
        return Err(bad());
    }
    let days = days_from_civil(y, m as u32, day as u32);
    Ok(((days * 86_400) + hh * 3600 + mm * 60 + ss) * 1000)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Year, month (1-12), day (1-31) of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u64) -> Record {
        Record {
            time_unix_ms: 1_714_566_896_789 + i as i64,
            frame: i,
            source: format!("img{i}.png"),
            image_sha256: ImageHash::of(&i.to_le_bytes()),
            width: 1500,
            height: 1152,
            detections: (0..i % 5)
                .map(|k| RecordDetection {
                    x: k as f64 * 10.5,
                    y: 3.25,
                    score: 0.5,
                })
                .collect(),
            refer: i.is_multiple_of(2),
            ma_count: (i % 5) as u32,
            model_version: "v1".into(),
            board: "desktop-sim".into(),
            elapsed_ms: 12.5,
            error: None,
            refer_score: Some(i as f64 / 10.0),
            attention_boxes: (0..i % 3)
                .map(|k| RecordBox {
                    x0: k as f64,
                    y0: 2.0,
                    x1: k as f64 + 64.0,
                    y1: 66.0,
                    weight: 0.25,
                })
                .collect(),
            frame_file: i
                .is_multiple_of(3)
                .then(|| format!("{}.png", ImageHash::of(&i.to_le_bytes()))),
        }
    }

    #[test]
    fn frame_round_trip_and_single_terminator() {
        let r = record(3);
        let frame = encode_frame(&r).unwrap();
        assert_eq!(frame.last(), Some(&0));
        assert_eq!(frame.iter().filter(|&&b| b == 0).count(), 1);
        assert_eq!(decode_frame(&frame[..frame.len() - 1]).unwrap(), r);
    }

    #[test]
    fn crc_is_iso_hdlc_over_the_payload() {
        // The standard check value of CRC-32/ISO-HDLC.
        assert_eq!(CRC32.checksum(b"123456789"), 0xCBF4_3926);
        let r = record(1);
        let frame = encode_frame(&r).unwrap();
        let decoded = cobs_decode(&frame[..frame.len() - 1]).unwrap();
        let payload = postcard::to_stdvec(&r).unwrap();
        assert_eq!(&decoded[..payload.len()], &payload[..]);
        assert_eq!(
            decoded[payload.len()..],
            CRC32.checksum(&payload).to_le_bytes()
        );
    }

    #[test]
    fn cobs_decoder_matches_postcard_encoder() {
        // Lengths around the 254-byte block boundary, with and without zeros.
        for len in [0usize, 1, 2, 253, 254, 255, 256, 508, 509, 1000] {
            for pattern in 0..3u8 {
                let data: Vec<u8> = (0..len)
                    .map(|i| match pattern {
                        0 => 1 + (i % 255) as u8,
                        1 => 0,
                        _ => (i * 7 % 256) as u8,
                    })
                    .collect();
                let enc = postcard::to_stdvec_cobs(&data).unwrap();
                let dec = cobs_decode(&enc[..enc.len() - 1]).unwrap();
                assert_eq!(dec, postcard::to_stdvec(&data).unwrap());
            }
        }
        assert_eq!(cobs_decode(&[5, 1, 2]), None);
        assert_eq!(cobs_decode(&[0]), None);
    }

    #[test]
    fn decode_reports_damage() {
        let frame = encode_frame(&record(4)).unwrap();
        let body = &frame[..frame.len() - 1];
        let mut bad = body.to_vec();
        let mid = bad.len() / 2;
        bad[mid] = if bad[mid] == 0x55 { 0x56 } else { 0x55 };
        assert!(decode_frame(&bad).is_err());
        assert!(decode_frame(&[1, 1]).unwrap_err().contains("too short"));
    }

    #[test]
    fn hash_hex_and_json() {
        let h = ImageHash::of(b"abc");
        assert_eq!(
            h.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            ImageHash::from_hex(&h.to_string().to_uppercase()).unwrap(),
            h
        );
        assert!(ImageHash::from_hex("xyz").is_err());
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{h}\""));
        assert_eq!(serde_json::from_str::<ImageHash>(&json).unwrap(), h);
        assert_eq!(postcard::to_stdvec(&h).unwrap(), h.0.to_vec());
    }

    #[test]
    fn time_formatting() {
        assert_eq!(format_time_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_time_utc(1_714_566_896_789),
            "2024-05-01T12:34:56.789Z"
        );
        assert_eq!(format_time_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_time_utc(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            format_time_utc(4_107_542_399_000),
            "2100-02-28T23:59:59.000Z"
        );
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }

    /// Wraps a file and fails the write (after writing `partial` bytes) or the sync.
    struct Failing<'a> {
        file: &'a mut File,
        partial: Option<usize>,
        fail_sync: bool,
        fail_truncate: bool,
    }

    impl AppendTarget for Failing<'_> {
        fn write_once(&mut self, buf: &[u8]) -> io::Result<usize> {
            match self.partial {
                Some(n) => {
                    self.file.write_all(&buf[..n])?;
                    Err(io::Error::from_raw_os_error(28)) // ENOSPC
                }
                None => self.file.write_once(buf),
            }
        }
        fn sync_data(&mut self) -> io::Result<()> {
            if self.fail_sync {
                Err(io::Error::other("sync failed"))
            } else {
                self.file.sync_data()
            }
        }
        fn set_len(&mut self, len: u64) -> io::Result<()> {
            if self.fail_truncate {
                Err(io::Error::other("truncate failed"))
            } else {
                AppendTarget::set_len(self.file, len)
            }
        }
        fn current_len(&mut self) -> io::Result<u64> {
            self.file.current_len()
        }
    }

    #[test]
    fn failed_write_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        let (mut log, _) = RecordLog::open(&path).unwrap();
        log.append(&record(0)).unwrap();
        let frame = encode_frame(&record(1)).unwrap();
        let mut target = Failing {
            file: &mut log.file,
            partial: Some(frame.len() / 2),
            fail_sync: false,
            fail_truncate: false,
        };
        let err = append_frame(&mut target, &mut log.state, &frame, &path).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("r.log") && msg.contains("not saved"), "{msg}");
        assert!(!log.state.dirty);
        log.append(&record(2)).unwrap();
        let (records, report) = read_all(&path).unwrap();
        assert!(report.is_clean(), "{report}");
        assert_eq!(records, vec![record(0), record(2)]);
    }

    #[test]
    fn failed_sync_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        let (mut log, _) = RecordLog::open(&path).unwrap();
        let frame = encode_frame(&record(1)).unwrap();
        let mut target = Failing {
            file: &mut log.file,
            partial: None,
            fail_sync: true,
            fail_truncate: false,
        };
        // The sync fails, and so does the sync after the cut: the state is dirty.
        assert!(append_frame(&mut target, &mut log.state, &frame, &path).is_err());
        log.append(&record(2)).unwrap();
        let (records, _) = read_all(&path).unwrap();
        assert_eq!(records.last(), Some(&record(2)));
    }

    #[test]
    fn failed_cut_resyncs_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        let (mut log, _) = RecordLog::open(&path).unwrap();
        log.append(&record(0)).unwrap();
        let frame = encode_frame(&record(1)).unwrap();
        let mut target = Failing {
            file: &mut log.file,
            partial: Some(frame.len() / 2),
            fail_sync: false,
            fail_truncate: true,
        };
        let err = append_frame(&mut target, &mut log.state, &frame, &path).unwrap_err();
        assert!(format!("{err:#}").contains("resync"), "{err:#}");
        assert!(log.state.dirty);
        log.append(&record(2)).unwrap();
        assert!(!log.state.dirty);
        let (records, report) = read_all(&path).unwrap();
        assert_eq!(records, vec![record(0), record(2)]);
        assert_eq!(report.corrupt_skipped(), 1, "{report}");
        assert_eq!(report.corrupt[0].frame, 1);
        // Reopening keeps both and reports the damaged frame.
        drop(log);
        let (_, report) = RecordLog::open(&path).unwrap();
        assert_eq!(report.records_ok, 2);
        assert_eq!(report.corrupt_skipped(), 1);
    }

    fn v1(r: &Record) -> RecordV1 {
        RecordV1 {
            time_unix_ms: r.time_unix_ms,
            frame: r.frame,
            source: r.source.clone(),
            image_sha256: r.image_sha256,
            width: r.width,
            height: r.height,
            detections: r.detections.clone(),
            refer: r.refer,
            ma_count: r.ma_count,
            model_version: r.model_version.clone(),
            board: r.board.clone(),
            elapsed_ms: r.elapsed_ms,
            error: r.error.clone(),
        }
    }

    fn v2(r: &Record) -> RecordV2 {
        RecordV2 {
            time_unix_ms: r.time_unix_ms,
            frame: r.frame,
            source: r.source.clone(),
            image_sha256: r.image_sha256,
            width: r.width,
            height: r.height,
            detections: r.detections.clone(),
            refer: r.refer,
            ma_count: r.ma_count,
            model_version: r.model_version.clone(),
            board: r.board.clone(),
            elapsed_ms: r.elapsed_ms,
            error: r.error.clone(),
            refer_score: r.refer_score,
            attention_boxes: r.attention_boxes.clone(),
        }
    }

    /// A log of `records` in an older layout, as an earlier device wrote it (version 1:
    /// 0.4 devices; version 2: 0.6.0 devices).
    fn write_old_log(path: &Path, version: u8, records: &[Record]) {
        let mut bytes = MAGIC.to_vec();
        bytes.push(version);
        for r in records {
            bytes.extend(match version {
                1 => encode_any(&v1(r)).unwrap(),
                2 => encode_any(&v2(r)).unwrap(),
                _ => unreachable!("not an older layout"),
            });
        }
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn version_2_logs_are_read_and_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.log");
        let old: Vec<Record> = (0..4).map(record).collect();
        write_old_log(&path, 2, &old);
        let (read, report) = read_all(&path).unwrap();
        assert!(report.is_clean(), "{report}");
        let without_frames: Vec<Record> = old.iter().map(|r| Record::from(v2(r))).collect();
        assert_eq!(read, without_frames);
        assert!(read.iter().all(|r| r.frame_file.is_none()));
        assert!(read.iter().any(|r| r.refer_score.is_some()));
        let (mut log, report) = RecordLog::open(&path).unwrap();
        let aside = dir.path().join("records.log.v2");
        assert_eq!(report.moved_aside, Some((2, aside.clone())));
        log.append(&record(3)).unwrap();
        drop(log);
        assert_eq!(read_all(&path).unwrap().0, vec![record(3)]);
        assert_eq!(read_all(&aside).unwrap().0, without_frames);
    }

    #[test]
    fn version_1_logs_are_read_and_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.log");
        let old: Vec<Record> = (0..3).map(record).collect();
        let as_v1 = |r: &Record| Record::from(v1(r));
        write_old_log(&path, 1, &old);

        // Read: every record, without the referral fields.
        let (read, report) = read_all(&path).unwrap();
        assert!(report.is_clean(), "{report}");
        assert_eq!(read, old.iter().map(as_v1).collect::<Vec<_>>());
        assert!(read.iter().all(|r| r.refer_score.is_none()));
        // A v1 frame is not a current frame: decoding it as the current layout fails.
        let frame = encode_any(&v1(&old[0])).unwrap();
        assert!(decode_frame(&frame[..frame.len() - 1]).is_err());

        // Open for appending: the old log is moved aside, a new one starts.
        let (mut log, report) = RecordLog::open(&path).unwrap();
        let aside = dir.path().join("records.log.v1");
        assert_eq!(report.moved_aside, Some((1, aside.clone())));
        assert!(report.created);
        let text = report.to_string();
        assert!(
            text.contains("records.log.v1") && text.contains("version 1"),
            "{text}"
        );
        log.append(&record(7)).unwrap();
        drop(log);
        assert_eq!(read_all(&path).unwrap().0, vec![record(7)]);
        assert_eq!(read_all(&aside).unwrap().0.len(), 3);

        // A second old log never overwrites the first one moved aside.
        write_old_log(&path, 1, &old[..1]);
        let (_, report) = RecordLog::open(&path).unwrap();
        let second = dir.path().join("records.log.v1.2");
        assert_eq!(report.moved_aside, Some((1, second.clone())));
        assert_eq!(read_all(&aside).unwrap().0.len(), 3);
        assert_eq!(read_all(&second).unwrap().0.len(), 1);
    }

    #[test]
    fn csv_and_summary_carry_the_referral() {
        let r = record(4);
        let row = csv_row(&r);
        assert!(
            row.ends_with(",0.4000,0.0:2.0:64.0:66.0:0.2500,\r\n"),
            "{row}"
        );
        assert_eq!(
            row.matches(',').count(),
            CSV_HEADER.matches(',').count(),
            "{row}"
        );
        let none = Record {
            refer_score: None,
            attention_boxes: Vec::new(),
            ..record(4)
        };
        assert!(csv_row(&none).ends_with(",,,\r\n"));
        assert!(csv_row(&record(3)).ends_with(&format!(",{}.png\r\n", record(3).image_sha256)));
        let summary = list_summary(&[r, none]);
        let lines: Vec<&str> = summary.lines().collect();
        assert!(lines[0].contains("refer_score 0.40 (1 boxes)"), "{summary}");
        assert!(!lines[1].contains("refer_score"), "{summary}");
    }

    #[test]
    fn times_parse_back_to_what_is_printed() {
        for ms in [0, 951_782_400_000, 1_714_566_896_000, 4_107_542_400_000] {
            let text = format_time_utc(ms);
            assert_eq!(parse_time_utc(&text[..19]).unwrap(), ms, "{text}");
        }
        assert_eq!(
            parse_time_utc("2024-05-01").unwrap(),
            parse_time_utc("2024-05-01T00:00:00Z").unwrap()
        );
        assert_eq!(
            parse_time_utc("2024-05-01 12:34").unwrap(),
            1_714_566_840_000
        );
        for bad in [
            "",
            "2024-13-01",
            "2023-02-29",
            "2024-05-01T24:00",
            "yesterday",
            "2024-5",
        ] {
            assert!(parse_time_utc(bad).is_err(), "{bad}");
        }
        assert!(parse_time_utc("2024-02-29").is_ok());
    }

    #[test]
    fn second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.log");
        let (_log, _) = RecordLog::open(&path).unwrap();
        let err = RecordLog::open(&path).unwrap_err();
        assert!(format!("{err:#}").contains("in use"), "{err:#}");
    }
}
