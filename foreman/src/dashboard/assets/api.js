// Talking to the foreman: JSON requests, endpoints that a foreman may not
// have yet (answered 404 by the router), and the live feed.

/** A 404. `missing` is true when the route itself is unknown to this foreman
 *  (an empty body), false when the API says the thing asked for is not there. */
export class NotFound extends Error {
  constructor(path, missing) {
    super(`${path}: not found`);
    this.missing = missing;
  }
}

// The client token: asked for once (when a call is refused with 401), kept
// in localStorage, sent on every call; streams carry it as ?access_token=
// because EventSource cannot send headers.
const TOKEN_KEY = "wasmgrid-token";

export function token() {
  try {
    return localStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

/** Forgets the stored token (the "forget token" link). */
export function forgetToken() {
  try {
    localStorage.removeItem(TOKEN_KEY);
  } catch {
    // No storage: nothing was kept.
  }
  window.dispatchEvent(new CustomEvent("wasmgrid-token"));
}

/** A stream's address, with the token when there is one. */
export function streamUrl(path) {
  const t = token();
  if (!t) return path;
  return `${path}${path.includes("?") ? "&" : "?"}access_token=${encodeURIComponent(t)}`;
}

let asking = null;

/** Shows the token form (once, however many calls were refused) and
 *  resolves when a token was entered. */
function askForToken(reason) {
  const form = document.querySelector("#token-form");
  document.querySelector("#token-reason").textContent = reason;
  form.hidden = false;
  if (asking) return asking;
  asking = new Promise((resolve) => {
    form.onsubmit = (event) => {
      event.preventDefault();
      const value = document.querySelector("#token-input").value.trim();
      if (!value) return;
      try {
        localStorage.setItem(TOKEN_KEY, value);
      } catch {
        // No storage: this page load still uses it through the retry below.
      }
      sessionToken = value;
      form.hidden = true;
      document.querySelector("#token-input").value = "";
      asking = null;
      window.dispatchEvent(new CustomEvent("wasmgrid-token"));
      resolve();
    };
  });
  document.querySelector("#token-input").focus();
  return asking;
}

/** For browsers that refuse localStorage: the token entered on this page. */
let sessionToken = null;

/** `fetch` with the token; a 401 asks for one and tries again. */
async function authorizedFetch(path, init = {}) {
  for (;;) {
    const t = token() ?? sessionToken;
    const headers = { ...(init.headers ?? {}) };
    if (t) headers.authorization = `Bearer ${t}`;
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    let reason = "This foreman needs a client token.";
    try {
      reason = (await response.json()).error.message;
    } catch {
      // Not the API's JSON: keep the general reason.
    }
    await askForToken(reason);
  }
}

export async function getJson(path) {
  const response = await authorizedFetch(path, { headers: { accept: "application/json" } });
  if (response.status === 404) {
    const body = await response.text();
    throw new NotFound(path, !body.includes('"error"'));
  }
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

export async function postJson(path, body = {}) {
  return sendJson("POST", path, body);
}

export async function deleteJson(path) {
  return sendJson("DELETE", path);
}

async function sendJson(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await authorizedFetch(path, init);
  if (!response.ok) {
    // The foreman says why ({"error": {"code", "message"}}); say it on.
    const refusal = await response.json().catch(() => null);
    throw new Error(refusal?.error?.message ?? `${path}: HTTP ${response.status}`);
  }
  return response.json();
}

// Who the caller is (`GET /api/whoami`), so pages offer only what its token
// may do; unknown (no token yet, or an older foreman) offers everything,
// and a refusal then asks for a token or says why.
let caller = null;

export async function refreshCaller() {
  try {
    caller = await getJson("/api/whoami");
  } catch {
    caller = null;
  }
  window.dispatchEvent(new CustomEvent("wasmgrid-caller"));
}

/** Whether the caller may cancel or delete `job`: an admin any, a user its own, a reader none. */
export function mayChange(job) {
  const role = caller?.role;
  if (!role || role === "admin") return true;
  return role === "user" && job.token_id != null && job.token_id === caller.token_id;
}

/** Which optional endpoints this foreman has: true, false, or null (unknown yet). */
export const support = { stats: null, tasks: null, summary: null, events: null };

/** `getJson`, or null when the foreman lacks the endpoint (remembered). */
export async function optional(kind, path) {
  if (support[kind] === false) return null;
  try {
    const value = await getJson(path);
    support[kind] = true;
    return value;
  } catch (error) {
    if (error instanceof NotFound && error.missing) {
      support[kind] = false;
      return null;
    }
    throw error;
  }
}

/** Events for the pages: "job", "worker", "stats" with a row each,
 *  "job_deleted" with the deleted job's id; "poll"
 *  once a second when there is no event stream (pages then fetch what they
 *  show); "mode" when the way of following changes. */
export class Feed extends EventTarget {
  constructor() {
    super();
    this.mode = "connecting";
    this.timer = null;
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  on(type, handler) {
    this.addEventListener(type, (event) => handler(event.detail));
  }

  setMode(mode) {
    this.mode = mode;
    this.emit("mode", mode);
  }

  start() {
    if (!window.EventSource) return this.poll();
    let opened = false;
    const source = new EventSource(streamUrl("/api/events"));
    this.source = source;
    for (const type of ["job", "job_deleted", "worker", "stats"]) {
      source.addEventListener(type, (event) => {
        try {
          this.emit(type, JSON.parse(event.data));
        } catch (error) {
          console.warn(`bad ${type} event`, error);
        }
      });
    }
    source.onopen = () => {
      opened = true;
      support.events = true;
      this.stopPolling();
      this.setMode("live");
      this.emit("poll"); // one snapshot; events keep it current
      this.resync ??= setInterval(() => this.mode === "live" && this.emit("poll"), 15_000);
    };
    source.onerror = () => {
      if (!opened || source.readyState === EventSource.CLOSED) {
        // No stream on this foreman (404), or it went for good: poll instead.
        source.close();
        if (!opened) support.events = false;
        this.poll();
        if (opened) setTimeout(() => this.start(), 30_000);
      } else {
        this.setMode("reconnecting");
      }
    };
  }

  /** A new token: a stream refused without one may open now. */
  retry() {
    if (this.mode === "live") return;
    this.source?.close();
    this.stopPolling();
    this.start();
  }

  poll() {
    if (this.timer) return;
    this.setMode("polling");
    const tick = () => this.emit("poll");
    tick();
    this.timer = setInterval(tick, 1000);
  }

  stopPolling() {
    clearInterval(this.timer);
    this.timer = null;
  }
}
