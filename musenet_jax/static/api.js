// musenet-serve's JSON API (/v1): the access token, calls and their errors, downloads, and jobs followed
// through their event stream (or by polling when the stream drops).
import { clearError, el, showError } from "./dom.js";

// -- the API ----------------------------------------------------------------------------------------------
// The access token comes in the page's address (?token=… or #token=… or #…); it is moved to the
// session's storage and out of the address bar, so that it is not shared with a copied link.
const token = (() => {
  const KEY = "musenet-serve-token";
  const params = new URLSearchParams(location.search);
  const hash = location.hash.replace(/^#/, "");
  let found = params.get("token");
  if (!found && hash) found = hash.includes("=") ? new URLSearchParams(hash).get("token") : decodeURIComponent(hash);
  if (found) {
    try { sessionStorage.setItem(KEY, found); } catch (e) { /* storage off: the token lives in memory */ }
    params.delete("token");
    const query = params.toString();
    history.replaceState(null, "", location.pathname + (query ? `?${query}` : ""));
    return found;
  }
  try { return sessionStorage.getItem(KEY); } catch (e) { return null; }
})();

function authHeaders(extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

export class ApiError extends Error {}

async function errorOf(response) {
  let message = "";
  try {
    const body = await response.clone().json();
    message = body && body.error ? String(body.error) : "";
  } catch (e) {
    message = "";
  }
  if (response.status === 401 || response.status === 403) {
    return new ApiError(message && response.status === 403 ? message
      : "This server needs an access token: open the page as /?token=YOUR_TOKEN.");
  }
  if (response.status === 429) {
    const retry = response.headers.get("Retry-After");
    const base = message || "The server is busy";
    return new ApiError(retry && !/retry/i.test(base) ? `${base}; try again in ${retry} s.` : base);
  }
  return new ApiError(message || `The server answered ${response.status} ${response.statusText}.`.trim());
}

export async function api(path, { method = "GET", body, signal } = {}) {
  let response;
  try {
    response = await fetch(path, {
      method,
      signal,
      headers: authHeaders(body === undefined ? {} : { "Content-Type": "application/json" }),
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError("Cannot reach the server: is musenet-serve still running?");
  }
  if (!response.ok) throw await errorOf(response);
  try {
    return await response.json();
  } catch (e) {
    throw new ApiError(`The server sent an unreadable answer to ${method} ${path}.`);
  }
}

// Saves a file from the API under a chosen name; fetched (not a plain link) so that the token header
// goes with it and a failure is shown as the error line instead of a downloaded error page.
async function download(url, filename) {
  let response;
  try {
    response = await fetch(url, { headers: authHeaders(), cache: "no-store" });
  } catch (e) {
    throw new ApiError("Cannot reach the server to download the file.");
  }
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 404) throw new ApiError(`${error.message} (the server keeps only recent pieces).`);
    throw error;
  }
  const blob = await response.blob();
  const href = URL.createObjectURL(blob);
  const a = el("a", { href, download: filename, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 60000);
}

export function downloadLink(text, url, filename, title) {
  const link = el("a", { class: "button secondary", href: url, download: filename, title, text });
  link.addEventListener("click", (event) => {
    event.preventDefault();
    if (link.getAttribute("aria-busy") === "true") return;
    clearError();
    link.setAttribute("aria-busy", "true");  // a WAV is rendered on first request: that can take a while
    download(url, filename).catch((e) => showError(e.message))
      .finally(() => link.removeAttribute("aria-busy"));
  });
  return link;
}

// -- jobs: submit, follow the event stream, fall back to polling ------------------------------------------
const FINAL = new Set(["done", "failed", "cancelled"]);

// Reads `text/event-stream` by hand: EventSource cannot send the Authorization header.
async function followEvents(url, onProgress, signal) {
  const response = await fetch(url, { headers: authHeaders({ Accept: "text/event-stream" }), signal,
    cache: "no-store" });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return null;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = val;
        else if (field === "data") data.push(val);
      }
      if (!data.length) continue;
      let payload;
      try { payload = JSON.parse(data.join("\n")); } catch (e) { continue; }
      if (event === "progress") onProgress(payload);
      else if (FINAL.has(event)) {
        reader.cancel().catch(() => {});
        return { ...payload, status: payload.status || event };
      }
    }
  }
}

async function pollJob(url, onProgress, signal) {
  for (;;) {
    const job = await api(url, { signal });
    if (FINAL.has(job.status)) return job;
    onProgress(job);
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// One generation request. Returns a handle at once ({cancel, done: Promise of the final job}).
export function startJob(body, path, { onQueued, onProgress }) {
  const controller = new AbortController();
  let jobId = null;
  let cancelled = false;
  const done = (async () => {
    const started = await api(path, { method: "POST", body, signal: controller.signal });
    jobId = started.id;
    onQueued(started);
    if (cancelled) api(`/v1/jobs/${jobId}`, { method: "DELETE" }).catch(() => {});
    const urls = started.urls || {};
    const events = urls.events || `/v1/jobs/${jobId}/events`;
    const self = urls.self || `/v1/jobs/${jobId}`;
    let final = null;
    try {
      final = await followEvents(events, onProgress, controller.signal);
    } catch (e) {
      if (e.name === "AbortError") throw e;
      final = null;  // a dropped stream: the job goes on, ask for its state instead
    }
    if (!final) final = await pollJob(self, onProgress, controller.signal);
    return { ...final, seed: started.seed };
  })();
  return {
    done,
    cancel() {
      cancelled = true;
      if (jobId) {
        api(`/v1/jobs/${jobId}`, { method: "DELETE" }).catch(() => controller.abort());
      } else {
        controller.abort();
      }
    },
  };
}
