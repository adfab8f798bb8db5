// Small formatting and DOM helpers shared by the pages.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

/** Text made safe to splice into HTML. */
export function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

export const $ = (selector, root = document) => root.querySelector(selector);

/** 1234567 → "1.23 M". */
export function si(n, digits = 3) {
  if (n == null || !Number.isFinite(Number(n))) return "–";
  n = Number(n);
  const units = ["", " k", " M", " G", " T", " P", " E"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return (i === 0 ? String(Math.round(n * 100) / 100) : n.toPrecision(digits)) + units[i];
}

export function bytes(n) {
  if (n == null || !Number.isFinite(Number(n))) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  n = Number(n);
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

/** Seconds as "4.2 s", "3 min 10 s", "2 h 5 min". */
export function duration(secs) {
  if (secs == null || !Number.isFinite(secs)) return "–";
  if (secs < 10) return `${secs.toFixed(1)} s`;
  if (secs < 60) return `${Math.round(secs)} s`;
  if (secs < 3600) return `${Math.floor(secs / 60)} min ${Math.round(secs % 60)} s`;
  return `${Math.floor(secs / 3600)} h ${Math.round((secs % 3600) / 60)} min`;
}

/** How long ago a unix-milliseconds time was. */
export function age(ms) {
  if (!ms) return "never";
  return `${duration(Math.max(0, Date.now() - ms) / 1000)} ago`;
}

/** Microseconds as milliseconds, short. */
export function micros(us) {
  if (us == null) return "–";
  return us < 10_000 ? `${(us / 1000).toFixed(1)}` : `${Math.round(us / 1000)}`;
}

/** Tasks of a job that have ended, whatever the way. */
export const done = (job) => job.succeeded + job.failed + job.cancelled;
/** Tasks that ran to an outcome: what a progress text counts. */
export const ran = (job) => job.succeeded + job.failed;

export const finished = (state) => ["completed", "failed", "cancelled"].includes(state);

/** A progress bar with "ran / total" in it; the text is `.progress-text`. */
export function progressBar(job) {
  const total = job.total || 0;
  const share = (n) => (total ? (100 * n) / total : 0);
  // Succeeded, then failed, then cancelled: a cancelled job's bar shows
  // how much of it ran, not a full bar.
  const [ok, failed, cancelled] = [share(job.succeeded), share(job.failed), share(job.cancelled)];
  return `<div class="progress" title="${job.succeeded} succeeded, ${job.failed} failed, ${job.cancelled} cancelled, ${job.running} running, ${job.queued} queued">
    <div class="bar" style="width:${ok.toFixed(2)}%"></div>
    <div class="bar failed" style="left:${ok.toFixed(2)}%;width:${failed.toFixed(2)}%"></div>
    <div class="bar cancelled" style="left:${(ok + failed).toFixed(2)}%;width:${cancelled.toFixed(2)}%"></div>
    <span class="progress-text">${ran(job)} / ${total}</span></div>`;
}

/** Keeps a few seconds of (time, done) samples per job to tell its rate. */
export class Rates {
  constructor(windowMs = 10_000) {
    this.windowMs = windowMs;
    this.samples = new Map();
  }

  add(job) {
    const now = Date.now();
    const list = this.samples.get(job.id) ?? [];
    const last = list[list.length - 1];
    if (!last || last.done !== done(job) || now - last.t > 1000) list.push({ t: now, done: done(job) });
    while (list.length > 2 && now - list[0].t > this.windowMs) list.shift();
    this.samples.set(job.id, list);
  }

  /** Tasks per second: recent when observed, else the job's average so far. */
  rate(job) {
    if (finished(job.state)) {
      // Tasks that ran: cancelling the rest took no time per task.
      const secs = ((job.finished_at_ms ?? 0) - (job.started_at_ms ?? 0)) / 1000;
      return secs > 0 ? (job.succeeded + job.failed) / secs : null;
    }
    const list = this.samples.get(job.id) ?? [];
    if (list.length >= 2) {
      const first = list[0];
      const last = list[list.length - 1];
      const secs = (Date.now() - first.t) / 1000;
      if (secs >= 1) return (last.done - first.done) / secs;
    }
    if (job.started_at_ms) {
      const secs = (Date.now() - job.started_at_ms) / 1000;
      return secs > 0 ? done(job) / secs : null;
    }
    return null;
  }

  /** Seconds left at the current rate. */
  eta(job) {
    if (finished(job.state)) return null;
    const rate = this.rate(job);
    const left = job.total - done(job);
    return rate > 0 ? left / rate : null;
  }
}
