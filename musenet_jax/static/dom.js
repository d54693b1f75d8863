// The page's small helpers: element lookup and building, number and name formatting, the error line.

// -- small helpers ----------------------------------------------------------------------------------------
export const $ = (sel, root = document) => root.querySelector(sel);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

export const clamp = (x, lo, hi) => Math.min(hi, Math.max(lo, x));

export function fmtSeconds(s) {
  return `${(Math.round(s * 10) / 10).toFixed(1)} s`;
}

export function prettyLabel(label) {
  const text = String(label).replace(/[_-]+/g, " ");
  return text.charAt(0).toUpperCase() + text.slice(1);
}

// Bundled openings are named FOLDER/FILE (composer or game / piece).
export function openingTitle(name) {
  return String(name).split("/").map(prettyLabel).join(" – ");
}

export function slug(text) {
  return String(text || "").toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "") || "piece";
}

// -- the error line ---------------------------------------------------------------------------------------
// Every failure ends here as one line: the page never goes blank or fails silently.
export function showError(message) {
  const text = String(message || "Something went wrong.").split("\n")[0];
  $("#error-text").textContent = text;
  $("#error").hidden = false;
}

export function clearError() {
  $("#error").hidden = true;
  $("#error-text").textContent = "";
}

window.addEventListener("error", (event) => showError(event.message || "Unexpected error in the page."));
window.addEventListener("unhandledrejection", (event) => {
  const reason = event.reason;
  showError(reason && reason.message ? reason.message : String(reason));
});
