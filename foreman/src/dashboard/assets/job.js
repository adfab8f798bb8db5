// One job: its progress, its tasks a page at a time, who ran them, how long
// they took, and for Mandelbrot jobs the picture the results make.

import { NotFound, deleteJson, getJson, mayChange, optional, postJson, streamUrl, support } from "./api.js";
import { barChart, histogram } from "./charts.js";
import { $, duration, esc, finished, micros, ran, si } from "./format.js";
import { Picture, isBand } from "./picture.js";

const PAGE = 50;
/** Without the tasks endpoint, all results are fetched: only for jobs this small. */
const FALLBACK_MAX_TASKS = 10_000;
/** The picture is assembled from at most this many bands. */
const PICTURE_MAX_TASKS = 5_000;

export class JobPage {
  constructor(feed, rates) {
    this.feed = feed;
    this.rates = rates;
    this.id = null;
    this.picture = new Picture($("#picture"));
    feed.on("poll", () => this.id != null && this.refreshJob());
    feed.on("job", (row) => row.id === this.id && this.applyJob(row));
    feed.on("job_deleted", ({ id }) => id === this.id && this.refreshJob());
    window.addEventListener("wasmgrid-caller", () => this.job && this.showActions(this.job));
    $("#tasks-filter").addEventListener("change", (e) => {
      this.filter = e.target.value;
      this.skip = 0;
      this.refreshTasks();
    });
    $("#tasks-pager").addEventListener("click", (e) => {
      const dir = Number(e.target.dataset.dir || 0);
      if (!dir) return;
      this.skip = Math.max(0, this.skip + dir * PAGE);
      this.refreshTasks();
    });
    $("#job-cancel").addEventListener("click", async () => {
      $("#job-cancel").disabled = true;
      try {
        await postJson(`/api/jobs/${this.id}/cancel`);
      } catch (error) {
        alert(`cancel failed: ${error.message}`);
      }
      this.refreshJob();
    });
    $("#job-delete").addEventListener("click", async () => {
      if (!confirm(`Delete job ${this.id} with all its tasks and results?`)) return;
      $("#job-delete").disabled = true;
      try {
        await deleteJson(`/api/jobs/${this.id}`);
        history.pushState(null, "", "/");
        window.dispatchEvent(new PopStateEvent("popstate"));
      } catch (error) {
        alert(`delete failed: ${error.message}`);
        $("#job-delete").disabled = false;
      }
    });
  }

  /** Cancel while the job runs, delete once it has finished; each only if the token may. */
  showActions(job) {
    const over = finished(job.state);
    $("#job-cancel").hidden = over || !mayChange(job);
    $("#job-delete").hidden = !over || !mayChange(job);
  }

  show(id) {
    this.hide();
    this.id = id;
    this.job = null;
    this.skip = 0;
    this.filter = "";
    this.results = null;
    this.picture.clear();
    this.pictureLoading = false;
    $("#tasks-filter").value = "";
    $("#job-id").textContent = id;
    $("#tasks tbody").innerHTML = "";
    for (const panel of ["#by-worker-panel", "#latency-panel", "#picture-panel"]) $(panel).hidden = true;
    document.title = `wasmgrid · job ${id}`;
    this.refreshJob().then(() => this.refreshAll());
    // The per-job stream, when the grid-wide one is missing.
    if (!support.events && window.EventSource) {
      this.source = new EventSource(streamUrl(`/api/jobs/${id}/events`));
      this.source.addEventListener("progress", (e) => this.applyJob(JSON.parse(e.data)));
      this.source.onerror = () => this.source?.close();
    }
    // The shown page of tasks and the summary follow the job while it runs.
    this.timer = setInterval(() => {
      if (this.job && (!finished(this.job.state) || !this.settled)) this.refreshAll();
    }, 2000);
  }

  hide() {
    this.id = null;
    clearInterval(this.timer);
    this.source?.close();
    this.source = null;
  }

  async refreshAll() {
    this.settled = Boolean(this.job && finished(this.job.state));
    this.refreshSummary();
    await this.refreshTasks();
    this.refreshPicture();
  }

  async refreshJob() {
    const id = this.id;
    try {
      const row = await getJson(`/api/jobs/${id}`);
      if (id === this.id) this.applyJob(row);
    } catch (error) {
      if (error instanceof NotFound && id === this.id) {
        $("#job-line").textContent = `There is no job ${id}.`;
        $("#job-cancel").hidden = $("#job-delete").hidden = true;
      }
    }
  }

  applyJob(job) {
    const before = this.job;
    this.job = job;
    this.rates.add(job);
    const total = job.total || 0;
    $("#job-state").className = `state ${job.state}`;
    $("#job-state").textContent = job.state;
    $("#job-bar").style.width = `${total ? (100 * ran(job)) / total : 0}%`;
    this.showActions(job);
    $("#job-cancel").disabled = false;
    $("#job-delete").disabled = false;
    const rate = this.rates.rate(job);
    const eta = this.rates.eta(job);
    const took = job.started_at_ms ? ((job.finished_at_ms ?? Date.now()) - job.started_at_ms) / 1000 : null;
    $("#job-line").innerHTML = [
      `<span class="progress-text">${ran(job)} / ${total}</span> tasks done`,
      `${job.succeeded} succeeded, ${job.failed} failed, ${job.cancelled} cancelled, ${job.running} running, ${job.queued} queued`,
      rate == null ? null : `${rate.toFixed(2)} tasks/s`,
      eta == null ? null : `ETA ${duration(eta)}`,
      took == null ? null : `${finished(job.state) ? "took" : "running for"} ${duration(took)}`,
      `fuel ${si(job.fuel_used)}`,
      `${esc(job.scheduler)} scheduler`,
      `module <span class="mono">${esc(job.module.slice(0, 12))}…</span>`,
    ]
      .filter(Boolean)
      .join(" · ");
    if (before && !finished(before.state) && finished(job.state)) {
      this.source?.close();
      this.refreshAll();
    }
  }

  async refreshTasks() {
    const id = this.id;
    if (id == null) return;
    let page;
    try {
      page = await this.taskPage(id);
    } catch (error) {
      console.warn("tasks", error);
      return;
    }
    if (id !== this.id || !page) return;
    const { total, tasks } = page;
    $("#tasks-count").textContent = `${si(total)}${this.filter ? ` ${this.filter}` : ""}`;
    const pager = $("#tasks-pager");
    pager.querySelector("span").textContent = tasks.length ? `${this.skip + 1}–${this.skip + tasks.length} of ${total}` : "";
    pager.querySelector('[data-dir="-1"]').disabled = this.skip === 0;
    pager.querySelector('[data-dir="1"]').disabled = this.skip + tasks.length >= total;
    // Re-rendering keeps open any output the reader opened.
    const open = new Set([...document.querySelectorAll("#tasks details[open]")].map((d) => d.dataset.key));
    $("#tasks tbody").innerHTML = tasks.map(taskRow).join("");
    for (const d of document.querySelectorAll("#tasks details")) d.open = open.has(d.dataset.key);
    if (tasks.some((t) => isBand(parse(t.result)))) this.wantPicture = true;
  }

  /** A page of tasks: from the tasks endpoint, or cut from all results. */
  async taskPage(id) {
    const status = this.filter ? `&status=${this.filter}` : "";
    const page = await optional("tasks", `/api/jobs/${id}/tasks?skip=${this.skip}&limit=${PAGE}${status}`);
    if (page) {
      $("#tasks-note").hidden = true;
      return page;
    }
    if (!this.job || this.job.total > FALLBACK_MAX_TASKS) {
      const note = $("#tasks-note");
      note.hidden = false;
      note.textContent = "This foreman cannot list a job's tasks a page at a time, and the job is too large to fetch whole.";
      return null;
    }
    const all = await this.fallbackTasks(id);
    const shown = this.filter ? all.filter((t) => t.state === this.filter) : all;
    return { total: shown.length, tasks: shown.slice(this.skip, this.skip + PAGE) };
  }

  /** Every task, as far as `/results` tells (no workers, timings or output). */
  async fallbackTasks(id) {
    const { results, failures } = await getJson(`/api/jobs/${id}/results`);
    this.results = results;
    const failed = new Map((failures ?? []).map((f) => [f.index, f]));
    const over = finished(this.job?.state);
    return results.map((result, index) => {
      const failure = failed.get(index) ?? null;
      let state = "queued";
      if (failure) state = failure.kind === "Cancelled" ? "cancelled" : "failed";
      else if (result != null) state = "succeeded";
      else if (over) state = "cancelled";
      return { index, state, result, failure, attempts: null, worker_name: null };
    });
  }

  async refreshSummary() {
    const id = this.id;
    let summary;
    try {
      summary = await optional("summary", `/api/jobs/${id}/summary`);
    } catch (error) {
      console.warn("summary", error);
      return;
    }
    if (!summary || id !== this.id) return;
    const kinds = Object.entries(summary.failures_by_kind ?? {});
    $("#job-failures").innerHTML = kinds.length
      ? `<span class="bad">failures: ${kinds.map(([k, n]) => `${n} ${esc(k)}`).join(", ")}</span>`
      : "";
    $("#by-worker-panel").hidden = false;
    barChart(
      $("#by-worker-chart"),
      (summary.by_worker ?? []).map((w) => ({ label: w.name || `#${w.worker}`, value: w.tasks })),
      { empty: "no task has run yet" },
    );
    $("#latency-panel").hidden = false;
    histogram($("#latency-chart"), summary.latency_ms ?? []);
  }

  /** For Mandelbrot results: every succeeded band, fetched a page at a time. */
  async refreshPicture() {
    const id = this.id;
    if (!this.wantPicture || this.pictureLoading || !this.job || this.job.total > PICTURE_MAX_TASKS) return;
    this.pictureLoading = true;
    try {
      if (support.tasks) {
        for (let skip = 0; id === this.id; skip += 200) {
          const page = await getJson(`/api/jobs/${id}/tasks?skip=${skip}&limit=200&status=succeeded`);
          for (const task of page.tasks) this.picture.add(parse(task.result));
          if (!page.tasks.length || skip + page.tasks.length >= page.total) break;
        }
      } else {
        for (const result of this.results ?? []) this.picture.add(parse(result));
      }
      if (id === this.id && this.picture.size) {
        $("#picture-panel").hidden = false;
        $("#picture-note").textContent = `${this.picture.size} of ${this.job.total} bands`;
        this.picture.draw();
      }
    } catch (error) {
      console.warn("picture", error);
    } finally {
      this.pictureLoading = false;
    }
  }
}

/** A result as a value, whether the API gave it parsed or as JSON text. */
function parse(result) {
  if (typeof result !== "string") return result;
  try {
    return JSON.parse(result);
  } catch {
    return result;
  }
}

function resultText(result) {
  const value = parse(result);
  if (value == null) return "";
  if (isBand(value)) return `band: rows ${value.first_row}–${value.first_row + value.rows - 1} × ${value.width}`;
  const text = JSON.stringify(value);
  return text.length > 200 ? `${text.slice(0, 200)}…` : text;
}

function output(index, name, text, truncated) {
  if (!text) return "";
  return `<details data-key="${index}-${name}"><summary>${name}${truncated ? " (cut)" : ""}</summary><pre>${esc(text)}</pre></details>`;
}

function taskRow(t) {
  const timings = t.timings
    ? `${micros(t.timings.load_us)} / ${micros(t.timings.instantiate_us)} / ${micros(t.timings.run_us)} ms`
    : "–";
  const outcome = t.failure
    ? `<span class="bad">${esc(t.failure.kind)}: ${esc(t.failure.message)}</span>`
    : esc(resultText(t.result));
  const worker = t.worker_name ?? (t.worker != null ? `#${t.worker}` : "–");
  return `<tr data-task="${t.index}">
    <td>${t.index}</td>
    <td><span class="state ${esc(t.state)}">${esc(t.state)}</span></td>
    <td>${t.attempts ?? "–"}</td>
    <td>${esc(worker)}</td>
    <td>${timings}</td>
    <td>${t.fuel_used == null ? "–" : si(t.fuel_used)}</td>
    <td class="clip mono" title="${esc(t.failure ? t.failure.message : resultText(t.result))}">${outcome}</td>
    <td>${output(t.index, "stdout", t.stdout, t.stdout_truncated)}${output(t.index, "stderr", t.stderr, t.stderr_truncated)}</td></tr>`;
}
