//! Turns the bands returned by the mandelbrot example into a PNG.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

#[derive(Deserialize)]
struct Band {
    first_row: u32,
    rows: u32,
    width: u32,
    iterations: Vec<u32>,
}

pub fn assemble(results: &Path, output: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(results)
        .with_context(|| format!("cannot read {}", results.display()))?;
    let bands: Vec<Option<Band>> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a JSON array of mandelbrot bands",
            results.display()
        )
    })?;
    let bands: Vec<Band> = bands.into_iter().flatten().collect();
    let Some(width) = bands.first().map(|b| b.width) else {
        bail!("{} holds no band", results.display());
    };
    let height = bands
        .iter()
        .map(|b| b.first_row + b.rows)
        .max()
        .unwrap_or(0);
    let max_iter = bands
        .iter()
        .flat_map(|b| b.iterations.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut pixels = vec![0u8; width as usize * height as usize * 3];
    for band in &bands {
        if band.width != width || band.iterations.len() != (band.rows * band.width) as usize {
            bail!(
                "band at row {} does not match the picture's width {width}",
                band.first_row
            );
        }
        let offset = band.first_row as usize * width as usize;
        for (i, &iterations) in band.iterations.iter().enumerate() {
            let rgb = colour(iterations, max_iter);
            pixels[(offset + i) * 3..(offset + i) * 3 + 3].copy_from_slice(&rgb);
        }
    }
    let file =
        File::create(output).with_context(|| format!("cannot create {}", output.display()))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&pixels)?;
    Ok(())
}

/// Points inside the set are black; the rest shade from deep blue to gold.
fn colour(iterations: u32, max_iter: u32) -> [u8; 3] {
    if iterations >= max_iter {
        return [0, 0, 0];
    }
    let t = (f64::from(iterations) / f64::from(max_iter)).sqrt();
    let channel = |a: f64, b: f64| (a + (b - a) * t).round().clamp(0.0, 255.0) as u8;
    [
        channel(10.0, 255.0),
        channel(20.0, 200.0),
        channel(90.0, 40.0),
    ]
}
