// Step-by-step mode's tree of takes, kept in the page: the root follows the chosen opening until a take grows
// from it; each take is a kept candidate that continues its parent. Drawn as a list, with the current take's
// roll, playback and downloads.
import { downloadLink } from "./api.js";
import { $, el, fmtSeconds, slug } from "./dom.js";
import { Roll, playButton, renderLegend } from "./roll.js";
import { instrumentOrder, maxSeconds, startSettings, state } from "./settings.js";
import { audio, stopPlayback } from "./synth.js";

// -- the tree of takes ------------------------------------------------------------------------------------
export const tree = { nodes: new Map(), root: null, current: null, taken: 0, busy: false };

export function resetTree() {
  tree.nodes.clear();
  tree.taken = 0;
  const root = { id: 0, parent: null, children: [], name: "Start", seconds: 0, notes: [], tokens: null };
  tree.nodes.set(0, root);
  tree.root = root;
  tree.current = root;
  refreshRoot();
  $("#advanced-results").replaceChildren();
  $("#advanced-legend").replaceChildren();
}

// While nothing has grown from it, the root follows the opening chosen in the settings.
export function refreshRoot() {
  const root = tree.root;
  if (!root || root.children.length || !state.model) {
    renderTree();
    return;
  }
  let start;
  try {
    start = startSettings();
  } catch (e) {
    start = { kind: "pending", fields: {}, seconds: 0, title: "Start", notes: [] };
  }
  Object.assign(root, { start, name: start.kind === "none" ? "Start" : start.title, seconds: start.seconds,
    notes: start.notes });
  renderTree();
}

function nodePath(node) {
  const path = [];
  for (let n = node; n; n = n.parent === null ? null : tree.nodes.get(n.parent)) path.unshift(n);
  return path;
}

export function renderTree() {
  const list = $("#tree");
  if (!tree.root) return;
  const item = (node) => {
    const isCurrent = node === tree.current;
    const onPath = nodePath(tree.current).includes(node);
    const delta = node.parent === null ? "" : node.span
      ? `↻ ${(Math.round(node.span[0] * 10) / 10).toFixed(1)}–${fmtSeconds(node.span[1])}`
      : `+${fmtSeconds(node.seconds - tree.nodes.get(node.parent).seconds)}`;
    const button = el("button", { type: "button", class: `node${isCurrent ? " current" : ""}${onPath ? " on-path"
      : ""}`, "aria-current": isCurrent ? "true" : null, dataset: { node: String(node.id) },
    title: node.parent === null ? node.name : `${node.name}: ${fmtSeconds(node.seconds)} (seed ${node.seed}, `
      + `candidate ${node.sample + 1})`,
    onclick: () => selectNode(node) },
    el("span", { class: "node-dot", "aria-hidden": "true" }),
    el("span", { class: "node-name", text: node.name }),
    el("span", { class: "node-len", text: fmtSeconds(node.seconds) }),
    delta ? el("span", { class: "node-delta", text: delta }) : null);
    const li = el("li", { class: "tree-item" }, button);
    if (node.children.length) li.append(el("ul", { class: "tree-children" }, node.children.map(item)));
    return li;
  };
  list.replaceChildren(item(tree.root));
  const grown = tree.root.children.length > 0;
  $("#new-piece").hidden = !grown;
  $("#opening-fields").disabled = grown && state.mode === "advanced";
  $("#opening-fields").title = grown && state.mode === "advanced"
    ? "The piece has started; choose New piece to start from another opening" : "";
  renderCurrent();
}

let shownCurrent = [];

export function renderCurrent() {
  const node = tree.current;
  if (!node) return;
  const room = maxSeconds() - node.seconds;
  $("#extend").disabled = tree.busy || room < 0.5;
  $("#regenerate").disabled = tree.busy;
  showSpanForm(node);
  if (room < 0.5 && !tree.busy) {
    $("#extend-status").textContent = `This take is as long as the model allows (${fmtSeconds(maxSeconds())}).`;
  }
  // Redrawn only when the take or its music changed, so that a take playing here keeps its Stop button.
  const shown = [node, node.name, node.seconds, node.notes, node.midiUrl];
  if (shown.every((value, i) => value === shownCurrent[i])) return;
  shownCurrent = shown;
  const view = $("#current-view");
  if (audio.playing && view.contains(audio.playing.owner)) stopPlayback();
  $("#current-name").textContent = node.name;
  $("#current-length").textContent = fmtSeconds(node.seconds);
  const actions = $("#current-actions");
  actions.replaceChildren();
  $("#current-legend").replaceChildren();
  if (node.notes && (node.notes.length || node.parent !== null)) {
    const parent = node.parent === null ? null : tree.nodes.get(node.parent);
    const roll = new Roll({ notes: node.notes, seconds: node.seconds, given: parent && !node.span ? parent.seconds
      : 0, span: node.span, height: 200, label: `Piano roll of ${node.name}` });
    view.replaceChildren(roll.el);
    renderLegend($("#current-legend"), node.notes.map((n) => n.instrument), instrumentOrder());
    actions.append(playButton(roll, node.notes, node.seconds, node.name));
  } else if (node.start && node.start.kind === "opening") {
    view.replaceChildren(el("p", { class: "placeholder", text: `${node.start.title} (${fmtSeconds(node.seconds)}): `
      + "extend it to hear how it goes on." }));
  } else {
    view.replaceChildren(el("p", { class: "placeholder",
      text: "Nothing yet: extend to write the first seconds, then pick the take you like." }));
  }
  if (node.midiUrl) {
    actions.append(downloadLink("Download MIDI", node.midiUrl, node.filename,
      `Download ${node.name} (the whole branch up to it) as MIDI`));
    if (node.wavUrl) {
      actions.append(downloadLink("WAV", node.wavUrl, node.filename.replace(/\.mid$/, ".wav"),
        `Download ${node.name} as audio rendered by the server`));
    }
  }
}

// The span form: offered for a take with music when the model can infill (/v1/model `infill`: a model from
// before infilling cannot). Its parts are the take's instruments; its times stay inside the take.
let spanFormFor = null;

function showSpanForm(node) {
  const form = $("#span-form");
  form.hidden = !(state.model && state.model.infill && node.tokens && node.tokens.length && node.seconds >= 0.5);
  if (form.hidden || spanFormFor === node) return;
  spanFormFor = node;
  const parts = [...new Set(node.notes.map((n) => n.instrument))].sort(
    (a, b) => instrumentOrder().indexOf(a) - instrumentOrder().indexOf(b));
  $("#span-parts").replaceChildren(el("option", { value: "", text: "All parts" }),
    ...parts.map((p) => el("option", { value: p, text: `Only ${p}` })));
  const from = $("#span-from");
  const to = $("#span-to");
  from.max = to.max = String(node.seconds);
  if (Number(to.value) > node.seconds || Number(from.value) >= Number(to.value)) {
    to.value = String(Math.floor(node.seconds * 2) / 2);
    from.value = String(Math.max(0, Number(to.value) - 2));
  }
}

function selectNode(node) {
  if (tree.current === node) return;
  stopPlayback();
  tree.current = node;
  renderTree();
  const button = document.querySelector(`#tree button[data-node="${node.id}"]`);
  if (button) button.focus();
}

export function addTake(parent, result, { seed, label }) {
  const id = tree.nodes.size;
  tree.taken += 1;
  const node = { id, parent: parent.id, children: [], name: `Take ${tree.taken}`, seconds: result.seconds,
    notes: result.notes, tokens: result.tokens, midiUrl: result.midi_url, wavUrl: result.wav_url,
    seed, sample: result.index, ended: result.ended, span: result.span || null };
  node.filename = `musenet-${slug(label || "any")}-take${tree.taken}-${Math.round(result.seconds)}s.mid`;
  tree.nodes.set(id, node);
  parent.children.push(node);
  tree.current = node;
  return node;
}
