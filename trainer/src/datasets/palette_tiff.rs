//! Palette (colour-mapped) TIFF masks, which the `image` crate does not decode: IDRiD's
//! original lesion masks are 1-bit palette TIFFs (index 0 black, index 1 the lesion
//! colour). Each pixel becomes the brightest channel of its palette colour, so lesion
//! pixels are non-zero and the background zero, as for a grey mask.
//!
//! Only what masks use is supported: 1, 2, 4 or 8 bits per pixel, one sample, strips,
//! uncompressed or PackBits, most significant bit first. Anything else is an error that
//! says what the file has.

use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, Result, bail};
use image::GrayImage;
use tiff::decoder::Decoder;
use tiff::tags::Tag;

const UNCOMPRESSED: u16 = 1;
const PACKBITS: u16 = 32773;
const PALETTE: u16 = 3;

/// True when `bytes` start like a TIFF file.
pub fn is_tiff(bytes: &[u8]) -> bool {
    bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*")
}

/// Decodes a palette TIFF to grey (see the module comment).
pub fn decode(bytes: &[u8], path: &Path) -> Result<GrayImage> {
    let what = || format!("palette TIFF {}", path.display());
    let mut d = Decoder::new(Cursor::new(bytes)).with_context(what)?;
    let tag16 = |d: &mut Decoder<Cursor<&[u8]>>, tag: Tag, default: Option<u16>| -> Result<u16> {
        match (d.find_tag_unsigned::<u16>(tag).with_context(what)?, default) {
            (Some(v), _) => Ok(v),
            (None, Some(v)) => Ok(v),
            (None, None) => bail!("{}: tag {tag:?} is missing", what()),
        }
    };
    let photometric = tag16(&mut d, Tag::PhotometricInterpretation, None)?;
    if photometric != PALETTE {
        bail!(
            "{}: not a palette image (photometric {photometric})",
            what()
        );
    }
    let bits = tag16(&mut d, Tag::BitsPerSample, Some(1))?;
    let samples = tag16(&mut d, Tag::SamplesPerPixel, Some(1))?;
    let compression = tag16(&mut d, Tag::Compression, Some(UNCOMPRESSED))?;
    let fill_order = tag16(&mut d, Tag::FillOrder, Some(1))?;
    if !matches!(bits, 1 | 2 | 4 | 8) || samples != 1 || fill_order != 1 {
        bail!(
            "{}: unsupported layout ({bits} bits per sample, {samples} samples, fill order \
             {fill_order})",
            what()
        );
    }
    if compression != UNCOMPRESSED && compression != PACKBITS {
        bail!(
            "{}: unsupported compression {compression} (uncompressed and PackBits are read)",
            what()
        );
    }
    let width = d.get_tag_u32(Tag::ImageWidth).with_context(what)?;
    let height = d.get_tag_u32(Tag::ImageLength).with_context(what)?;
    if width == 0 || height == 0 || u64::from(width) * u64::from(height) > 1 << 28 {
        bail!("{}: implausible size {width}x{height}", what());
    }
    let rows_per_strip = d
        .find_tag_unsigned::<u32>(Tag::RowsPerStrip)
        .with_context(what)?
        .unwrap_or(height)
        .clamp(1, height);
    let offsets = d.get_tag_u64_vec(Tag::StripOffsets).with_context(what)?;
    let counts = d.get_tag_u64_vec(Tag::StripByteCounts).with_context(what)?;
    let colormap = d.get_tag_u16_vec(Tag::ColorMap).with_context(what)?;
    let entries = 1usize << bits;
    if colormap.len() != 3 * entries {
        bail!(
            "{}: colour map has {} values, expected {}",
            what(),
            colormap.len(),
            3 * entries
        );
    }
    // Brightest channel of each palette colour, 16 -> 8 bits.
    let level: Vec<u8> = (0..entries)
        .map(|i| {
            let max = colormap[i]
                .max(colormap[entries + i])
                .max(colormap[2 * entries + i]);
            (max >> 8) as u8
        })
        .collect();

    let stride = (width as usize * bits as usize).div_ceil(8);
    let strips = height.div_ceil(rows_per_strip) as usize;
    if offsets.len() < strips || counts.len() < strips {
        bail!(
            "{}: {} strip offsets and {} byte counts for {strips} strips",
            what(),
            offsets.len(),
            counts.len()
        );
    }
    let mut packed = Vec::with_capacity(stride * height as usize);
    for s in 0..strips {
        let (start, len) = (offsets[s] as usize, counts[s] as usize);
        let raw = bytes
            .get(start..start.saturating_add(len))
            .with_context(|| format!("{}: strip {s} lies outside the file", what()))?;
        let rows = (height as usize - s * rows_per_strip as usize).min(rows_per_strip as usize);
        let want = rows * stride;
        let strip = if compression == PACKBITS {
            unpack_bits(raw, want).with_context(|| format!("{}: strip {s}", what()))?
        } else {
            raw.to_vec()
        };
        if strip.len() < want {
            bail!(
                "{}: strip {s} holds {} bytes, {want} needed",
                what(),
                strip.len()
            );
        }
        packed.extend_from_slice(&strip[..want]);
    }
    let per_byte = 8 / bits as usize;
    let mask = ((1u16 << bits) - 1) as u8;
    Ok(GrayImage::from_fn(width, height, |x, y| {
        let byte = packed[y as usize * stride + x as usize / per_byte];
        let shift = 8 - bits as usize * (x as usize % per_byte + 1);
        image::Luma([level[((byte >> shift) & mask) as usize]])
    }))
}

/// PackBits (TIFF compression 32773) until `want` bytes are out.
fn unpack_bits(mut input: &[u8], want: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(want);
    while out.len() < want {
        let (&n, rest) = input.split_first().context("PackBits data ends early")?;
        input = rest;
        match n as i8 {
            -128 => {}
            k @ 0..=127 => {
                let len = k as usize + 1;
                let (lit, rest) = input
                    .split_at_checked(len)
                    .context("PackBits literal run ends early")?;
                out.extend_from_slice(lit);
                input = rest;
            }
            k => {
                let (&b, rest) = input.split_first().context("PackBits repeat ends early")?;
                out.extend(std::iter::repeat_n(b, 1 + (-k) as usize));
                input = rest;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian palette TIFF, written field by field.
    fn palette_tiff(
        width: u16,
        height: u16,
        bits: u16,
        rows_per_strip: u16,
        compression: u16,
        strips: &[Vec<u8>],
    ) -> Vec<u8> {
        let entries = 1usize << bits;
        let mut colormap = vec![0u16; 3 * entries];
        colormap[1] = 0xffff; // index 1: red
        let mut data = Vec::new();
        let mut offsets = Vec::new();
        let mut counts = Vec::new();
        let header = 8u32;
        for s in strips {
            offsets.push(header + data.len() as u32);
            counts.push(s.len() as u32);
            data.extend_from_slice(s);
        }
        let mut extra = Vec::new();
        let at = |v: &[u8], extra: &mut Vec<u8>| {
            let o = header + data.len() as u32 + extra.len() as u32;
            extra.extend_from_slice(v);
            o
        };
        let cmap_bytes: Vec<u8> = colormap.iter().flat_map(|v| v.to_le_bytes()).collect();
        let cmap_at = at(&cmap_bytes, &mut extra);
        let off_bytes: Vec<u8> = offsets.iter().flat_map(|v| v.to_le_bytes()).collect();
        let cnt_bytes: Vec<u8> = counts.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (off_at, cnt_at) = if strips.len() > 1 {
            (at(&off_bytes, &mut extra), at(&cnt_bytes, &mut extra))
        } else {
            (offsets[0], counts[0])
        };
        let ifd_at = header + data.len() as u32 + extra.len() as u32;
        let mut out = b"II*\0".to_vec();
        out.extend_from_slice(&ifd_at.to_le_bytes());
        out.extend_from_slice(&data);
        out.extend_from_slice(&extra);
        let n = strips.len() as u32;
        let mut entries_: Vec<(u16, u16, u32, u32)> = vec![
            (256, 3, 1, width as u32),
            (257, 3, 1, height as u32),
            (258, 3, 1, bits as u32),
            (259, 3, 1, compression as u32),
            (262, 3, 1, 3),
            (273, 4, n, off_at),
            (277, 3, 1, 1),
            (278, 3, 1, rows_per_strip as u32),
            (279, 4, n, cnt_at),
            (320, 3, 3 * entries as u32, cmap_at),
        ];
        entries_.sort();
        out.extend_from_slice(&(entries_.len() as u16).to_le_bytes());
        for (tag, typ, count, value) in entries_ {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&typ.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(&value.to_le_bytes());
        }
        out.extend_from_slice(&0u32.to_le_bytes());
        out
    }

    #[test]
    fn one_bit_strips_uncompressed_and_packbits() {
        // 10x3, rows of 2 bytes: pixel (0,0), (9,1) and (4,2) are index 1.
        let rows = [[0b1000_0000u8, 0], [0, 0b0100_0000], [0b0000_1000, 0]];
        let plain = palette_tiff(
            10,
            3,
            1,
            2,
            UNCOMPRESSED,
            &[[rows[0], rows[1]].concat(), rows[2].to_vec()],
        );
        assert!(is_tiff(&plain));
        let img = decode(&plain, Path::new("m.tif")).unwrap();
        let on: Vec<(u32, u32)> = img
            .enumerate_pixels()
            .filter(|p| p.2.0[0] != 0)
            .map(|p| (p.0, p.1))
            .collect();
        assert_eq!(on, [(0, 0), (9, 1), (4, 2)]);
        assert_eq!(img.get_pixel(0, 0).0[0], 255);

        // The same rows PackBits-coded: a literal run, then a repeat of zeros.
        let packed = |r: [u8; 2]| vec![0u8, r[0], 0, r[1]];
        let strip0 = [packed(rows[0]), packed(rows[1])].concat();
        let strip1 = vec![1u8, rows[2][0], rows[2][1]];
        let pb = palette_tiff(10, 3, 1, 2, PACKBITS, &[strip0, strip1]);
        assert_eq!(decode(&pb, Path::new("m.tif")).unwrap(), img);
    }

    #[test]
    fn damaged_files_are_errors_naming_the_file() {
        let good = palette_tiff(10, 1, 1, 1, UNCOMPRESSED, &[vec![0, 0]]);
        let cut = &good[..good.len() - 30];
        let e = format!("{:#}", decode(cut, Path::new("cut.tif")).unwrap_err());
        assert!(e.contains("cut.tif"), "{e}");
        let short = palette_tiff(10, 2, 1, 2, UNCOMPRESSED, &[vec![0, 0]]);
        let e = format!("{:#}", decode(&short, Path::new("short.tif")).unwrap_err());
        assert!(e.contains("short.tif") && e.contains("needed"), "{e}");
        let lzw = palette_tiff(10, 1, 1, 1, 5, &[vec![0, 0]]);
        let e = format!("{:#}", decode(&lzw, Path::new("lzw.tif")).unwrap_err());
        assert!(e.contains("compression 5"), "{e}");
    }
}
