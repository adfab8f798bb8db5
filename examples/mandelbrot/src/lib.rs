//! Renders a band of rows of the Mandelbrot set: one task per band, the bands
//! together make the picture (`cargo xtask mandelbrot-png` assembles them).

use serde::{Deserialize, Serialize};
use wasmgrid_guest::task;

/// The picture and the part of the complex plane it shows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct View {
    pub width: u32,
    pub height: u32,
    pub center_x: f64,
    pub center_y: f64,
    /// Width of the view in the complex plane.
    pub scale: f64,
    pub max_iter: u32,
}

/// Escape iterations of `rows` rows starting at `first_row`, row-major;
/// `max_iter` means the point did not escape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Band {
    pub first_row: u32,
    pub rows: u32,
    pub width: u32,
    pub iterations: Vec<u32>,
}

/// Largest picture a task accepts, so a typo cannot ask for gigabytes.
pub const MAX_PIXELS: u64 = 1 << 26;

#[task]
fn render_rows(view: View, first_row: u32, rows: u32) -> Result<Band, String> {
    if u64::from(view.width) * u64::from(view.height) > MAX_PIXELS {
        return Err(format!(
            "{}x{} is larger than {MAX_PIXELS} pixels",
            view.width, view.height
        ));
    }
    if u64::from(first_row) + u64::from(rows) > u64::from(view.height) {
        return Err(format!(
            "rows {first_row}..{} are outside the picture's {} rows",
            u64::from(first_row) + u64::from(rows),
            view.height
        ));
    }
    Ok(render(&view, first_row, rows))
}

pub fn render(view: &View, first_row: u32, rows: u32) -> Band {
    let step = view.scale / f64::from(view.width);
    let left = view.center_x - view.scale / 2.0;
    let top = view.center_y + step * f64::from(view.height) / 2.0;
    let mut iterations = Vec::with_capacity(view.width as usize * rows as usize);
    for row in first_row..first_row + rows {
        let ci = top - step * f64::from(row);
        for col in 0..view.width {
            let cr = left + step * f64::from(col);
            iterations.push(escape_time(cr, ci, view.max_iter));
        }
    }
    Band {
        first_row,
        rows,
        width: view.width,
        iterations,
    }
}

fn escape_time(cr: f64, ci: f64, max_iter: u32) -> u32 {
    let (mut zr, mut zi) = (0.0f64, 0.0f64);
    for i in 0..max_iter {
        let (zr2, zi2) = (zr * zr, zi * zi);
        if zr2 + zi2 > 4.0 {
            return i;
        }
        zi = 2.0 * zr * zi + ci;
        zr = zr2 - zi2 + cr;
    }
    max_iter
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIEW: View = View {
        width: 64,
        height: 48,
        center_x: -0.75,
        center_y: 0.0,
        scale: 3.0,
        max_iter: 100,
    };

    #[test]
    fn origin_is_inside_and_far_points_escape() {
        assert_eq!(escape_time(0.0, 0.0, 50), 50);
        assert_eq!(escape_time(2.0, 2.0, 50), 1);
    }

    #[test]
    fn bands_tile_the_picture() {
        let whole = render(&VIEW, 0, 48);
        let mut joined = render(&VIEW, 0, 20).iterations;
        joined.extend(render(&VIEW, 20, 28).iterations);
        assert_eq!(whole.iterations, joined);
    }

    #[test]
    fn rows_outside_the_picture_are_refused() {
        assert!(render_rows(VIEW, 40, 10).is_err());
    }
}
