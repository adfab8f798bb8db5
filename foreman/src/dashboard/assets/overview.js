// The overview: grid totals, workers, jobs and the throughput chart.

import { deleteJson, getJson, mayChange, optional, postJson, support } from "./api.js";
import { lineChart } from "./charts.js";
import { $, age, bytes, done, duration, esc, finished, progressBar, si } from "./format.js";

const PAGE = 20;

export class Overview {
  constructor(feed, rates) {
    this.feed = feed;
    this.rates = rates;
    this.workers = new Map();
    this.jobs = [];
    this.skip = 0;
    this.filter = "";
    this.throughput = [];
    this.lastStats = null;
    this.failureKinds = new Map(); // job id → {failed, text}
    this.visible = false;

    feed.on("poll", () => this.visible && this.refresh());
    feed.on("worker", (row) => {
      this.workers.set(row.id, row);
      if (this.visible) this.renderWorkers();
    });
    feed.on("job", (row) => this.applyJob(row));
    feed.on("job_deleted", ({ id }) => {
      this.jobs = this.jobs.filter((job) => job.id !== id);
      if (this.visible) this.renderJobs();
    });
    feed.on("stats", (stats) => this.applyStats(stats));
    window.addEventListener("wasmgrid-caller", () => this.visible && this.renderJobs());

    $("#jobs-filter").addEventListener("change", (e) => {
      this.filter = e.target.value;
      this.skip = 0;
      this.refreshJobs();
    });
    $("#jobs-pager").addEventListener("click", (e) => {
      const dir = Number(e.target.dataset.dir || 0);
      if (!dir) return;
      this.skip = Math.max(0, this.skip + dir * PAGE);
      this.refreshJobs();
    });
    $("#jobs tbody").addEventListener("click", (e) => this.onJobsClick(e));
    // Ages and the chart move on even when nothing is reported.
    setInterval(() => {
      if (!this.visible) return;
      this.renderWorkers();
      this.renderChart();
    }, 1000);
  }

  show() {
    this.visible = true;
    // Drawn now, not at the next tick: the panel is otherwise blank (or a
    // stale picture) for up to a second after coming back to the page.
    this.renderChart();
    this.refresh();
  }

  hide() {
    this.visible = false;
  }

  async refresh() {
    await Promise.all([this.refreshWorkers(), this.refreshJobs(), this.refreshStats()]).catch((error) =>
      console.warn("refresh", error),
    );
  }

  async refreshWorkers() {
    const rows = await getJson("/api/workers");
    this.workers = new Map(rows.map((w) => [w.id, w]));
    this.renderWorkers();
  }

  async refreshJobs() {
    const status = this.filter ? `&status=${this.filter}` : "";
    const rows = await getJson(`/api/jobs?skip=${this.skip}&limit=${PAGE}${status}`);
    this.jobs = rows;
    for (const job of rows) this.rates.add(job);
    this.renderJobs();
  }

  async refreshStats() {
    // With an event stream, stats arrive as events; otherwise ask.
    if (support.events) return;
    const stats = await optional("stats", "/api/stats");
    if (stats) this.applyStats(stats);
    else this.deriveStats();
  }

  applyJob(row) {
    this.rates.add(row);
    const i = this.jobs.findIndex((j) => j.id === row.id);
    if (i >= 0) this.jobs[i] = row;
    else if (this.skip === 0 && (!this.filter || this.filter === row.state) && (!this.jobs.length || row.id > this.jobs[0].id)) {
      this.jobs.unshift(row);
      if (this.jobs.length > PAGE) this.jobs.pop();
    } else return;
    if (this.visible) this.renderJobs();
  }

  applyStats(stats) {
    this.lastStats = stats;
    this.throughput.push({ t: Date.now(), v: stats.tasks_per_second ?? 0 });
    this.trimThroughput();
    const panel = $("#stats-panel");
    panel.hidden = false;
    $("#stat-workers").textContent = stats.connected_workers;
    $("#stat-slots").textContent = `${stats.busy_slots ?? stats.active_tasks} / ${stats.total_slots}`;
    $("#stat-jobs").textContent = `${stats.running_jobs} / ${stats.queued_jobs}`;
    $("#stat-done").textContent = `${si(stats.total_tasks_completed)} / ${si(stats.total_tasks_failed)}`;
    $("#stat-rate").textContent = (stats.tasks_per_second ?? 0).toFixed(1);
    $("#stat-fuel").textContent = si(stats.fuel_consumed);
  }

  /** Without /api/stats: throughput from the shown jobs' progress. */
  deriveStats() {
    const now = Date.now();
    const total = this.jobs.reduce((sum, j) => sum + done(j), 0);
    const previous = this.derived;
    this.derived = { t: now, total };
    if (previous && now > previous.t) {
      const v = Math.max(0, (total - previous.total) / ((now - previous.t) / 1000));
      this.throughput.push({ t: now, v });
      this.trimThroughput();
    }
  }

  trimThroughput() {
    const cutoff = Date.now() - 125_000;
    while (this.throughput.length && this.throughput[0].t < cutoff) this.throughput.shift();
  }

  renderChart() {
    lineChart($("#throughput-chart"), this.throughput);
  }

  renderWorkers() {
    const rows = [...this.workers.values()].sort((a, b) => a.name.localeCompare(b.name) || a.id - b.id);
    $("#workers-empty").hidden = rows.length > 0;
    const online = rows.filter((w) => w.online).length;
    $("#workers-count").textContent = rows.length ? `${online} online of ${rows.length}` : "";
    $("#workers tbody").innerHTML = rows.map(workerRow).join("");
  }

  renderJobs() {
    $("#jobs-empty").hidden = this.jobs.length > 0 || this.skip > 0;
    const pager = $("#jobs-pager");
    pager.querySelector("span").textContent = this.jobs.length
      ? `${this.skip + 1}–${this.skip + this.jobs.length}`
      : "";
    pager.querySelector('[data-dir="-1"]').disabled = this.skip === 0;
    pager.querySelector('[data-dir="1"]').disabled = this.jobs.length < PAGE;
    $("#jobs tbody").innerHTML = this.jobs.map((job) => this.jobRow(job)).join("");
    for (const job of this.jobs) this.fetchFailureKinds(job);
  }

  jobRow(job) {
    const rate = this.rates.rate(job);
    const eta = this.rates.eta(job);
    const kinds = this.failureKinds.get(job.id);
    const failures = job.failed
      ? `<span class="bad">${kinds && kinds.failed === job.failed ? esc(kinds.text) : job.failed}</span>`
      : "0";
    const action = !mayChange(job)
      ? ""
      : finished(job.state)
        ? `<button class="danger" data-delete="${job.id}">delete</button>`
        : `<button class="danger" data-cancel="${job.id}">cancel</button>`;
    return `<tr data-job="${job.id}">
      <td><a href="/jobs/${job.id}" data-route>${job.id}</a></td>
      <td><span class="state ${esc(job.state)}">${esc(job.state)}</span></td>
      <td>${progressBar(job)}</td>
      <td>${rate == null ? "–" : `${rate.toFixed(rate < 10 ? 2 : 0)}/s`}</td>
      <td>${job.state === "completed" ? "done" : duration(eta)}</td>
      <td>${failures}</td>
      <td>${esc(job.scheduler)}${job.priority ? ` (p ${job.priority})` : ""}</td>
      <td>${action}</td></tr>`;
  }

  /** Failures by kind, from the job's summary, fetched when its count changes. */
  async fetchFailureKinds(job) {
    if (!job.failed || support.summary === false) return;
    const known = this.failureKinds.get(job.id);
    if (known && (known.failed === job.failed || known.pending)) return;
    this.failureKinds.set(job.id, { ...known, pending: true });
    try {
      const summary = await optional("summary", `/api/jobs/${job.id}/summary`);
      const kinds = Object.entries(summary?.failures_by_kind ?? {});
      const text = kinds.map(([kind, n]) => `${n} ${kind}`).join(", ") || String(job.failed);
      this.failureKinds.set(job.id, { failed: job.failed, text });
      if (this.visible && summary) this.renderJobs();
    } catch {
      this.failureKinds.delete(job.id);
    }
  }

  async onJobsClick(event) {
    const { cancel, delete: remove } = event.target.dataset;
    if (!cancel && !remove) return;
    if (remove && !confirm(`Delete job ${remove} with all its tasks and results?`)) return;
    event.target.disabled = true;
    try {
      if (cancel) await postJson(`/api/jobs/${cancel}/cancel`);
      else await deleteJson(`/api/jobs/${remove}`);
    } catch (error) {
      alert(`${cancel ? "cancel" : "delete"} failed: ${error.message}`);
    }
    this.refreshJobs();
  }
}

/** A worker's status: the foreman's word when it gives one. */
export function workerStatus(w) {
  if (w.status) return w.status;
  if (!w.online) return "offline";
  if (w.draining) return "draining";
  if (w.cooldown_until_ms && w.cooldown_until_ms > Date.now()) return "cooling-down";
  if (!w.last_seen_ms) return "starting";
  return "healthy";
}

/** How a volunteer lets its tasks share its PC: a priority below normal, a CPU cap. */
function sharing(w) {
  const parts = [];
  if (w.priority && w.priority !== "normal") parts.push(`${w.priority} priority`);
  if (w.cpu_limit_percent && w.cpu_limit_percent < 100) parts.push(`${w.cpu_limit_percent} % CPU`);
  return parts.length ? ` <small class="muted">${esc(parts.join(" · "))}</small>` : "";
}

function workerRow(w) {
  const status = workerStatus(w);
  const used = w.slots_used ?? w.running ?? 0;
  const speed = w.speed ?? w.benchmark_fuel_per_sec;
  const memory = w.memory_bytes ? `${bytes(w.memory_used_bytes)} / ${bytes(w.memory_bytes)}` : "–";
  const failures = `${si(w.tasks_failed ?? 0)}${w.recent_failures ? ` <small class="bad">(${w.recent_failures} recent)</small>` : ""}`;
  return `<tr data-worker="${w.id}" title="${esc(w.hostname)} · ${esc(w.cpu_model)} · ${w.cores} cores">
    <td>${esc(w.name)}</td>
    <td><span class="state ${esc(status)}">${esc(status)}</span></td>
    <td>${used} / ${w.slots}${sharing(w)}</td>
    <td>${speed ? `${si(speed)} fuel/s` : "–"}</td>
    <td>${w.online ? `${((w.cpu_permille ?? 0) / 10).toFixed(0)} %` : "–"}</td>
    <td title="worker process: ${bytes(w.worker_rss_bytes)}">${w.online ? memory : "–"}</td>
    <td>${failures}</td>
    <td>${w.fuel_used == null ? "–" : si(w.fuel_used)}</td>
    <td>${w.online ? age(w.last_heartbeat_ms ?? w.last_seen_ms) : `offline, seen ${age(w.last_seen_ms)}`}</td></tr>`;
}

