// The dashboard's entry: follows the foreman and shows the overview at `/`
// or a job at `/jobs/{id}` (also `#/jobs/{id}`), without reloading the page.

import { Feed, forgetToken, refreshCaller, token } from "./api.js";
import { $, Rates } from "./format.js";
import { JobPage } from "./job.js";
import { Overview } from "./overview.js";

const feed = new Feed();
const rates = new Rates();
const overview = new Overview(feed, rates);
const jobPage = new JobPage(feed, rates);

const MODES = {
  connecting: "connecting…",
  live: "● live (server-sent events)",
  polling: "● live (polling every second)",
  reconnecting: "○ reconnecting…",
};
function showForget() {
  $("#forget-token").hidden = !token();
}
$("#forget-token").addEventListener("click", (event) => {
  event.preventDefault();
  forgetToken();
});
window.addEventListener("wasmgrid-token", () => {
  showForget();
  feed.retry();
  refreshCaller();
});
showForget();
refreshCaller();

feed.on("mode", (mode) => {
  $("#feed").textContent = MODES[mode] ?? mode;
  $("#feed").dataset.mode = mode;
});

/** The job id the address names, if any. */
function jobInAddress() {
  const match = /^\/jobs\/(\d+)\/?$/.exec(location.pathname) ?? /^#\/jobs\/(\d+)$/.exec(location.hash);
  return match ? Number(match[1]) : null;
}

function route() {
  const id = jobInAddress();
  $("#overview-page").hidden = id != null;
  $("#job-page").hidden = id == null;
  if (id == null) {
    jobPage.hide();
    document.title = "wasmgrid";
    overview.show();
  } else {
    overview.hide();
    jobPage.show(id);
  }
}

// In-page links change the address and the view, never reload.
document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-route]");
  if (!link || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  if (link.getAttribute("href") !== location.pathname + location.hash) history.pushState(null, "", link.href);
  route();
});
window.addEventListener("popstate", route);
window.addEventListener("hashchange", route);

route();
feed.start();
