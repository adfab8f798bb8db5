// Small hand-drawn canvas charts: a line over time, labelled bars, a histogram.

const INK = "#6b7785";
const GRID = "#e1e5ea";
const FONT = "11px system-ui, sans-serif";

/** The canvas's 2D context scaled for the screen, cleared; its CSS size. */
function prepare(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = Number(canvas.dataset.width || canvas.width);
  const height = Number(canvas.dataset.height || canvas.height);
  canvas.dataset.width = width;
  canvas.dataset.height = height;
  if (canvas.width !== Math.round(width * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = FONT;
  return { ctx, width, height };
}

/** A round number at or above `n`, for an axis's top. */
function niceMax(n) {
  if (!(n > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(n));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= n) return step * power;
  return 10 * power;
}

function short(n) {
  if (n >= 1e6) return `${+(n / 1e6).toPrecision(3)}M`;
  if (n >= 1e3) return `${+(n / 1e3).toPrecision(3)}k`;
  return `${+n.toPrecision(3)}`;
}

function yAxis(ctx, left, top, bottom, right, max) {
  ctx.strokeStyle = GRID;
  ctx.fillStyle = INK;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 2; i += 1) {
    const y = bottom - ((bottom - top) * i) / 2;
    ctx.beginPath();
    ctx.moveTo(left, y + 0.5);
    ctx.lineTo(right, y + 0.5);
    ctx.stroke();
    ctx.fillText(short((max * i) / 2), left - 4, y);
  }
}

function message(ctx, width, height, text) {
  ctx.fillStyle = INK;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.fillText(text, width / 2, height / 2);
}

/** `points`: [{t (ms), v}], drawn over the last `windowMs` up to now. */
export function lineChart(canvas, points, { windowMs = 120_000, color = "#457b9d" } = {}) {
  const { ctx, width, height } = prepare(canvas);
  const left = 36, right = width - 6, top = 8, bottom = height - 16;
  const now = Date.now();
  const shown = points.filter((p) => now - p.t <= windowMs);
  const max = niceMax(Math.max(0, ...shown.map((p) => p.v)));
  yAxis(ctx, left, top, bottom, right, max);
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  ctx.fillText(`−${windowMs / 1000} s`, left + 14, bottom + 3);
  ctx.fillText("now", right - 12, bottom + 3);
  if (shown.length < 2) return message(ctx, width, height, "waiting for data…");
  const x = (t) => left + ((right - left) * (t - (now - windowMs))) / windowMs;
  const y = (v) => bottom - ((bottom - top) * v) / max;
  ctx.beginPath();
  ctx.moveTo(x(shown[0].t), bottom);
  for (const p of shown) ctx.lineTo(x(p.t), y(p.v));
  ctx.lineTo(x(shown[shown.length - 1].t), bottom);
  ctx.closePath();
  ctx.fillStyle = `${color}33`;
  ctx.fill();
  ctx.beginPath();
  shown.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p.v)) : ctx.moveTo(x(p.t), y(p.v))));
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.stroke();
  ctx.lineWidth = 1;
}

/** Vertical bars: `items` [{label, value}], the value above each bar. */
export function barChart(canvas, items, { color = "#2a9d8f", empty = "no data yet" } = {}) {
  const { ctx, width, height } = prepare(canvas);
  const left = 36, right = width - 6, top = 14, bottom = height - 18;
  if (!items.length) return message(ctx, width, height, empty);
  const max = niceMax(Math.max(...items.map((i) => i.value)));
  yAxis(ctx, left, top, bottom, right, max);
  const slot = (right - left) / items.length;
  const bar = Math.max(2, Math.min(48, slot * 0.7));
  items.forEach((item, i) => {
    const cx = left + slot * (i + 0.5);
    const h = ((bottom - top) * item.value) / max;
    ctx.fillStyle = item.color || color;
    ctx.fillRect(cx - bar / 2, bottom - h, bar, h);
    ctx.fillStyle = INK;
    ctx.textAlign = "center";
    ctx.textBaseline = "bottom";
    if (slot > 18) ctx.fillText(short(item.value), cx, bottom - h - 1);
    ctx.textBaseline = "top";
    const label = String(item.label);
    const fit = Math.max(1, Math.floor(slot / 6));
    if (slot > 14) ctx.fillText(label.length > fit ? `${label.slice(0, fit - 1)}…` : label, cx, bottom + 3);
  });
}

/** Latency buckets [{le, count}] (the last `le: null`) as a histogram. */
export function histogram(canvas, buckets, { color = "#e9a23b" } = {}) {
  const items = buckets.map((b, i) => ({
    label: b.le == null ? `>${short(buckets[i - 1]?.le ?? 0)}` : `≤${short(b.le)}`,
    value: b.count,
  }));
  // Leading and trailing empty buckets say nothing.
  while (items.length && items[items.length - 1].value === 0) items.pop();
  while (items.length && items[0].value === 0) items.shift();
  barChart(canvas, items, { color, empty: "no finished task yet" });
}
