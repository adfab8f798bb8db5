// The Mandelbrot example's results, assembled into a picture as
// `cargo xtask mandelbrot-png` does: each result is a band of rows.

/** Whether a task's result is a band of the mandelbrot example. */
export function isBand(value) {
  return (
    value != null &&
    typeof value === "object" &&
    Number.isInteger(value.first_row) &&
    Number.isInteger(value.rows) &&
    Number.isInteger(value.width) &&
    Array.isArray(value.iterations) &&
    value.iterations.length === value.rows * value.width
  );
}

/** Points inside the set are black; the rest shade from deep blue to gold. */
function colour(iterations, maxIter) {
  if (iterations >= maxIter) return [0, 0, 0];
  const t = Math.sqrt(iterations / maxIter);
  const channel = (a, b) => Math.max(0, Math.min(255, Math.round(a + (b - a) * t)));
  return [channel(10, 255), channel(20, 200), channel(90, 40)];
}

/** Draws bands on a canvas sized to the picture they make. */
export class Picture {
  constructor(canvas) {
    this.canvas = canvas;
    this.bands = new Map(); // first_row → band
  }

  clear() {
    this.bands.clear();
  }

  add(band) {
    if (isBand(band)) this.bands.set(band.first_row, band);
  }

  get size() {
    return this.bands.size;
  }

  draw() {
    const bands = [...this.bands.values()];
    if (!bands.length) return;
    const width = bands[0].width;
    const height = Math.max(...bands.map((b) => b.first_row + b.rows));
    let maxIter = 1;
    for (const band of bands) for (const i of band.iterations) if (i > maxIter) maxIter = i;
    if (this.canvas.width !== width || this.canvas.height !== height) {
      this.canvas.width = width;
      this.canvas.height = height;
      // Shown at most 480 px wide; pixels stay crisp.
      const scale = Math.min(1, 480 / width);
      this.canvas.style.width = `${Math.round(width * scale)}px`;
      this.canvas.style.height = `${Math.round(height * scale)}px`;
    }
    const ctx = this.canvas.getContext("2d");
    const image = ctx.createImageData(width, height);
    for (const band of bands) {
      if (band.width !== width) continue;
      let p = band.first_row * width * 4;
      for (const iterations of band.iterations) {
        const [r, g, b] = colour(iterations, maxIter);
        image.data[p] = r;
        image.data[p + 1] = g;
        image.data[p + 2] = b;
        image.data[p + 3] = 255;
        p += 4;
      }
    }
    ctx.putImageData(image, 0, 0);
  }
}
