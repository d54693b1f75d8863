// The model's description and the settings form: filling it from /v1/model, reading the sampling settings
// and the chosen start (none, a bundled opening, an uploaded MIDI file) from it.
import { $, el, fmtSeconds, openingTitle, prettyLabel, showError, slug } from "./dom.js";
import { parseMidi } from "./midi.js";
import { colourOf } from "./roll.js";

// -- the model and the settings form ----------------------------------------------------------------------
// The model's description (/v1/model), the uploaded MIDI file, and the mode shown (simple / advanced).
export const state = { model: null, upload: null, mode: "simple" };

const NUM_CANDIDATES = 4;

function numSamples() {
  const most = state.model && state.model.limits ? state.model.limits.max_num_samples : NUM_CANDIDATES;
  return Math.max(1, Math.min(NUM_CANDIDATES, most || NUM_CANDIDATES));
}

export function maxSeconds() {
  return state.model && state.model.limits ? state.model.limits.max_seconds : 600;
}

// The model's instruments, in its order (for the legends).
export function instrumentOrder() {
  return state.model ? state.model.instruments : [];
}

// Shows the model's description and fills the form with its labels, instruments, openings and limits.
export function showModel(model) {
  const info = model.model || {};
  const parameters = info.parameters >= 1e6 ? `${(info.parameters / 1e6).toFixed(1)}M`
    : info.parameters >= 1e3 ? `${Math.round(info.parameters / 1e3)}k` : `${info.parameters}`;
  $("#model-info").textContent = `Model at step ${model.step} · ${parameters} parameters · `
    + `${info.layers} layers · ${info.context_tokens}-token context${model.audio ? " · WAV rendering on" : ""}`;

  const style = $("#style");
  style.replaceChildren(el("option", { value: "none", text: "Any (no style)" }),
    ...model.labels.map((label) => el("option", { value: label, text: prettyLabel(label) })));

  const list = $("#instrument-list");
  list.replaceChildren();
  const preferred = model.instruments.includes("piano") ? ["piano"] : model.instruments.slice(0, 1);
  for (const name of model.instruments) {
    const id = `inst-${slug(name)}`;
    list.append(el("label", { class: "chip", for: id },
      el("input", { type: "checkbox", id, name: "instruments", value: name, checked: preferred.includes(name) }),
      el("span", { class: "swatch", style: `background:${colourOf(name)}`, "aria-hidden": "true" }),
      el("span", { text: prettyLabel(name) })));
  }

  const opening = $("#opening");
  opening.replaceChildren(el("option", { value: "none", text: "None: start from silence" }));
  if (model.openings && model.openings.length) {
    opening.append(el("optgroup", { label: "Bundled openings" }, ...model.openings.map((o) =>
      el("option", { value: `opening:${o.name}`,
        text: `${openingTitle(o.name)} · ${(o.instruments || []).join(", ")} · ${fmtSeconds(o.seconds)}`,
      }))));
  }
  opening.append(el("option", { value: "upload", text: "My MIDI file…" }));

  const most = maxSeconds();
  for (const input of [$("#length"), $("#primer-seconds")]) input.max = String(most);
  $("#length").value = String(Math.min(20, most));
  $("#extend-by").max = String(most);
  $("#extend-by").value = String(Math.min(5, most));
}

function selectedInstruments() {
  return [...document.querySelectorAll('#instrument-list input[type="checkbox"]:checked')].map((i) => i.value);
}

function checkInstruments(names) {
  for (const input of document.querySelectorAll('#instrument-list input[type="checkbox"]')) {
    if (names.includes(input.value)) input.checked = true;
  }
}

export function readNumber(input, { name, min = -Infinity, max = Infinity, integer = false, optional = false }) {
  const raw = input.value.trim();
  if (raw === "" && optional) return null;
  const value = Number(raw);
  if (raw === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new Error(`${name} must be a${integer ? " whole" : ""} number.`);
  }
  if (value < min || value > max) {
    throw new Error(`${name} must be between ${min} and ${max}.`);
  }
  return value;
}

// The settings every request shares.
export function samplingSettings() {
  const instruments = selectedInstruments();
  if (!instruments.length) throw new Error("Choose at least one instrument.");
  return { ...drawSettings(), instruments };
}

// The style and the sampling settings alone (a span's rewrite keeps the take's instruments).
export function drawSettings() {
  const style = $("#style").value;
  return {
    label: style === "none" ? null : style,
    temperature: Number($("#temperature").value),
    top_p: readNumber($("#top-p"), { name: "Top-p", min: 0.01, max: 1 }),
    top_k: readNumber($("#top-k"), { name: "Top-k", min: 0, integer: true }),
    seed: readNumber($("#seed"), { name: "Seed", min: 0, integer: true, optional: true }),
    num_samples: numSamples(),
  };
}

// The chosen start: kind none / opening / upload, the request fields for it, and its length in seconds.
export function startSettings() {
  const choice = $("#opening").value;
  const keep = readNumber($("#primer-seconds"), { name: "Keep the first", min: 0.1, max: maxSeconds(),
    optional: true });
  if (choice.startsWith("opening:")) {
    const name = choice.slice("opening:".length);
    const opening = state.model.openings.find((o) => o.name === name);
    const seconds = keep === null ? opening.seconds : Math.min(keep, opening.seconds);
    return { kind: "opening", name, fields: { opening: name, primer_seconds: keep }, seconds,
      title: `Opening: ${openingTitle(name)}`, notes: null };
  }
  if (choice === "upload") {
    const upload = state.upload;
    if (!upload) throw new Error("Choose a MIDI file to start from, or pick another opening.");
    const full = upload.seconds;
    if (full === null && keep === null) {
      throw new Error("This MIDI file's length is unknown: say how many seconds of it to keep.");
    }
    const seconds = keep === null ? full : full === null ? keep : Math.min(keep, full);
    const notes = upload.notes ? upload.notes.filter((n) => n.start < seconds)
      .map((n) => ({ ...n, end: Math.min(n.end, seconds) })) : null;
    return { kind: "upload", name: upload.name, fields: { primer_midi: upload.base64, primer_seconds: keep },
      seconds, title: `My file: ${upload.name}`, notes };
  }
  return { kind: "none", fields: {}, seconds: 0, title: "Start", notes: [] };
}

// The form's answer to a change of opening (app.js then refreshes the tree's root).
export function applyOpeningChoice() {
  const choice = $("#opening").value;
  $("#upload-field").hidden = choice !== "upload";
  $("#primer-field").hidden = choice === "none";
  if (choice.startsWith("opening:") && state.model) {
    const opening = state.model.openings.find((o) => `opening:${o.name}` === choice);
    if (opening) {
      if (opening.label && state.model.labels.includes(opening.label)) $("#style").value = opening.label;
      checkInstruments(opening.instruments || []);
    }
  }
  if (choice === "upload" && state.upload) checkInstruments(state.upload.instruments);
}

// Reads the chosen MIDI file into `state.upload` (app.js then refreshes the tree's root).
export async function readUpload() {
  const file = $("#upload").files[0];
  state.upload = null;
  $("#upload-info").textContent = "";
  if (!file) return;
  const most = state.model.limits.max_upload_bytes;
  if (most && file.size > most) {
    showError(`${file.name} is ${Math.ceil(file.size / 1024)} KiB; this server takes MIDI files up to `
      + `${Math.floor(most / 1024)} KiB.`);
    $("#upload").value = "";
    return;
  }
  const bytes = new Uint8Array(await file.arrayBuffer());
  let parsed = null;
  try {
    parsed = parseMidi(bytes, state.model.instruments);
  } catch (e) {
    parsed = null;
  }
  let base64 = "";
  for (let i = 0; i < bytes.length; i += 0x8000) base64 += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  state.upload = { name: file.name, base64: btoa(base64), seconds: parsed ? parsed.seconds : null,
    notes: parsed ? parsed.notes : null, instruments: parsed ? parsed.instruments : [] };
  $("#upload-info").textContent = parsed
    ? `${fmtSeconds(parsed.seconds)} · ${parsed.notes.length} notes${parsed.instruments.length
      ? ` · ${parsed.instruments.map(prettyLabel).join(", ")}` : ""}`
    : "Could not read this file here; the server will say whether it can.";
  checkInstruments(state.upload.instruments);
}
