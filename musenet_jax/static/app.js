// MuseNet co-composer: the page over musenet-serve's JSON API (/v1). Plain JavaScript, no build step.
//
// Simple mode: one request of four candidates, each drawn as a piano roll, playable, downloadable.
// Step-by-step mode: a tree of takes kept in the page; extending a take sends its tokens back as
// `continue_from`, and the chosen candidate becomes a child of that take. A span of a take can be rewritten
// (/v1/infill: the music before and after it kept); a kept rewrite is a child take of the same length.
//
// The page's modules: dom.js (helpers, the error line), api.js (the API, token, jobs and their event stream),
// settings.js (the model and the settings form), midi.js (reading an uploaded MIDI file), synth.js (playback),
// roll.js (piano rolls), cards.js (candidate cards), tree.js (the tree of takes); this one wires the page:
// simple mode, step-by-step mode, the tabs.
import { api } from "./api.js";
import { generateInto } from "./cards.js";
import { $, clearError, el, fmtSeconds, showError, slug } from "./dom.js";
import { applyOpeningChoice, drawSettings, maxSeconds, readNumber, readUpload, samplingSettings, showModel,
  startSettings, state } from "./settings.js";
import { audio, stopPlayback } from "./synth.js";
import { addTake, refreshRoot, renderCurrent, renderTree, resetTree, tree } from "./tree.js";

// -- the model --------------------------------------------------------------------------------------------
async function loadModel() {
  const model = await api("/v1/model");
  state.model = model;
  showModel(model);
  onOpeningChange();
  resetTree();
  document.body.dataset.ready = "true";
}

function onOpeningChange() {
  applyOpeningChoice();
  refreshRoot();
}

async function onUpload() {
  await readUpload();
  refreshRoot();
}

// -- simple mode ------------------------------------------------------------------------------------------
async function onGenerate(event) {
  event.preventDefault();
  clearError();
  let body;
  let start;
  try {
    start = startSettings();
    const seconds = readNumber($("#length"), { name: "Length", min: 1, max: maxSeconds() });
    if (start.seconds >= seconds) {
      throw new Error(`Length must be longer than the opening (${fmtSeconds(start.seconds)}).`);
    }
    body = { ...samplingSettings(), ...start.fields, seconds };
  } catch (e) {
    showError(e.message);
    return;
  }
  await generateInto({
    body, container: $("#simple-results"), legend: $("#simple-legend"), status: $("#simple-status"),
    button: $("#generate"), cancelButton: $("#simple-cancel"), given: start.seconds,
    filenameOf: (result, job) => `musenet-${slug(body.label || "any")}-seed${job.seed}-${result.index + 1}.mid`,
    extrasOf: (result, job) => [el("button", { type: "button", class: "button secondary develop",
      title: "Continue this candidate step by step", text: "Build on this →",
      onclick: () => developCandidate(start, body, result, job) })],
  });
}

// -- step-by-step mode ------------------------------------------------------------------------------------
async function onExtend(event) {
  event.preventDefault();
  clearError();
  const parent = tree.current;
  let body;
  try {
    const by = readNumber($("#extend-by"), { name: "Extend by", min: 0.5, max: maxSeconds() });
    const seconds = Math.min(maxSeconds(), parent.seconds + by);
    if (seconds - parent.seconds < 0.5) throw new Error(`This take is as long as the model allows.`);
    let from;
    if (parent.parent === null) {
      refreshRoot();
      from = parent.children.length ? parent.start.fields : startSettings().fields;
    } else {
      from = { continue_from: parent.tokens };
    }
    body = { ...samplingSettings(), ...from, seconds };
  } catch (e) {
    showError(e.message);
    return;
  }
  tree.busy = true;
  $("#regenerate").disabled = true;
  const heading = el("h2", { class: "candidates-title",
    text: `Continuations of ${parent.name} (${fmtSeconds(parent.seconds)} → ${fmtSeconds(body.seconds)})` });
  try {
    await generateInto({
      body, container: $("#advanced-results"), legend: $("#advanced-legend"), status: $("#extend-status"),
      button: $("#extend"), cancelButton: $("#extend-cancel"), given: parent.seconds, heading,
      filenameOf: (result, job) => `musenet-${slug(body.label || "any")}-seed${job.seed}-${result.index + 1}.mid`,
      extrasOf: keepButton(parent, body.label),
    });
  } finally {
    tree.busy = false;
    renderCurrent();
  }
}

// A span of the current take rewritten: the candidates keep the take's length, and a kept one becomes its child.
async function onRegenerate(event) {
  event.preventDefault();
  clearError();
  const parent = tree.current;
  let body;
  try {
    const from = readNumber($("#span-from"), { name: "Regenerate from", min: 0, max: parent.seconds });
    const to = readNumber($("#span-to"), { name: "Regenerate to", min: 0, max: parent.seconds });
    if (!(to - from >= 0.1)) throw new Error("The span must last at least 0.1 s: set 'to' after 'from'.");
    const part = $("#span-parts").value;
    body = { ...drawSettings(), tokens: parent.tokens, from_seconds: from, to_seconds: to,
      instruments: part ? [part] : null };
  } catch (e) {
    showError(e.message);
    return;
  }
  tree.busy = true;
  $("#extend").disabled = true;
  const what = body.instruments ? `the ${body.instruments[0]} of ` : "";
  const heading = el("h2", { class: "candidates-title", text: `Rewrites of ${what}${parent.name}, `
    + `${fmtSeconds(body.from_seconds)} to ${fmtSeconds(body.to_seconds)}` });
  try {
    await generateInto({
      body, container: $("#advanced-results"), legend: $("#advanced-legend"), status: $("#span-status"),
      button: $("#regenerate"), cancelButton: $("#span-cancel"), given: 0, heading, path: "/v1/infill",
      target: body.to_seconds - body.from_seconds,
      filenameOf: (result, job) => `musenet-${slug(body.label || "any")}-seed${job.seed}-${result.index + 1}.mid`,
      extrasOf: keepButton(parent, body.label),
    });
  } finally {
    tree.busy = false;
    renderCurrent();
  }
}

// A candidate's "Keep this take" button: the kept candidate becomes a child of `parent`.
function keepButton(parent, label) {
  return (result, job) => [el("button", { type: "button", class: "button keep", text: "Keep this take",
    "aria-label": `Keep candidate ${result.index + 1}`,
    onclick: () => keepTake(parent, result, { seed: job.seed, label }) })];
}

function keepTake(parent, result, info) {
  stopPlayback();
  const node = addTake(parent, result, info);
  $("#advanced-results").replaceChildren(el("p", { class: "kept-note", text: `Kept ${node.name}. Extend it again,`
    + " or click an earlier take in the tree to branch from there." }));
  $("#advanced-legend").replaceChildren();
  $("#extend-status").textContent = "";
  renderTree();
  const button = document.querySelector(`#tree button[data-node="${node.id}"]`);
  if (button) button.focus();
}

// A simple-mode candidate becomes the first take of a new step-by-step piece.
function developCandidate(start, body, result, job) {
  stopPlayback();
  resetTree();
  Object.assign(tree.root, { start, name: start.kind === "none" ? "Start" : start.title, seconds: start.seconds,
    notes: start.notes });
  if (start.kind !== "none" && start.kind !== "upload") {
    const select = $("#opening");
    select.value = start.kind === "opening" ? `opening:${start.name}` : select.value;
  }
  addTake(tree.root, result, { seed: job.seed, label: body.label });
  selectMode("advanced");
  renderTree();
}

function onNewPiece() {
  stopPlayback();
  resetTree();
  $("#extend-status").textContent = "";
  renderTree();
}

// -- tabs -------------------------------------------------------------------------------------------------
const MODES = ["simple", "advanced"];

function selectMode(name, focus = false) {
  state.mode = name;
  for (const m of MODES) {
    const tab = $(`#tab-${m}`);
    const on = m === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`#panel-${m}`).hidden = !on;
    if (on && focus) tab.focus();
  }
  document.body.dataset.mode = name;
  stopPlayback();
  renderTree();
}

function setUpTabs() {
  for (const m of MODES) {
    const tab = $(`#tab-${m}`);
    tab.addEventListener("click", () => selectMode(m));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (step) {
        event.preventDefault();
        selectMode(MODES[(MODES.indexOf(m) + step + MODES.length) % MODES.length], true);
      } else if (event.key === "Home" || event.key === "End") {
        event.preventDefault();
        selectMode(event.key === "Home" ? MODES[0] : MODES[MODES.length - 1], true);
      }
    });
  }
}

// -- start ------------------------------------------------------------------------------------------------
function init() {
  setUpTabs();
  $("#error-close").addEventListener("click", clearError);
  $("#temperature").addEventListener("input", () => {
    $("#temperature-out").textContent = Number($("#temperature").value).toFixed(2);
  });
  $("#opening").addEventListener("change", onOpeningChange);
  $("#primer-seconds").addEventListener("input", refreshRoot);
  $("#upload").addEventListener("change", () => onUpload().catch((e) => showError(e.message)));
  $("#settings").addEventListener("submit", (event) => event.preventDefault());
  $("#simple-form").addEventListener("submit", onGenerate);
  $("#extend-form").addEventListener("submit", onExtend);
  $("#span-form").addEventListener("submit", onRegenerate);
  $("#new-piece").addEventListener("click", onNewPiece);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && audio.playing) stopPlayback();
  });
  const start = () => loadModel().catch((e) => {
    $("#model-info").textContent = "Model unavailable";
    showError(`Cannot load the model's description: ${e.message}`);
    const retry = el("button", { type: "button", class: "button secondary small", text: "Retry",
      onclick: () => { retry.remove(); clearError(); start(); } });
    $("#model-info").append(" ", retry);
  });
  start();
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
