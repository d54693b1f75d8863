// Candidate cards: one request's pieces, each with its progress bar, then its piano roll, playback and
// downloads.
import { ApiError, downloadLink, startJob } from "./api.js";
import { clamp, clearError, el, fmtSeconds, prettyLabel, showError } from "./dom.js";
import { Roll, playButton, renderLegend } from "./roll.js";
import { instrumentOrder } from "./settings.js";
import { stopPlayback } from "./synth.js";

// -- candidate cards --------------------------------------------------------------------------------------
function candidateCard(index, target) {
  const title = `Candidate ${index + 1}`;
  const progress = el("progress", { max: "1", value: "0", "aria-label": `${title} progress` });
  const progressText = el("span", { class: "progress-text", text: `0.0 / ${fmtSeconds(target)}` });
  const card = el("article", { class: "candidate", "aria-label": title, dataset: { index: String(index),
    state: "waiting" } },
  el("header", { class: "card-head" }, el("h3", { text: title }), el("span", { class: "card-meta" })),
  el("div", { class: "progress-row" }, progress, progressText),
  el("div", { class: "card-body" }),
  el("div", { class: "card-actions" }));
  card.setProgress = (done, total) => {
    progress.value = total > 0 ? clamp(done / total, 0, 1) : 0;
    progressText.textContent = `${done.toFixed(1)} / ${fmtSeconds(total)}`;
    card.dataset.state = "running";
  };
  return card;
}

// Fills a card with its finished piece. `extra` adds buttons (keep this take, develop it).
function fillCard(card, result, { given, filename, extra = [] }) {
  const index = Number(card.dataset.index);
  const name = `candidate ${index + 1}`;
  card.dataset.state = "done";
  card.querySelector(".progress-row").hidden = true;
  const meta = card.querySelector(".card-meta");
  const instruments = [...new Set(result.notes.map((n) => n.instrument))];
  // A piece that did not end by itself was stopped at the server's token cap: say so, as it may stop abruptly.
  meta.textContent = `${fmtSeconds(result.seconds)} · ${result.notes.length} notes${result.ended ? "" : " · cut"}`;
  meta.title = result.ended ? "" : "Stopped at the most tokens a piece may have; it may end abruptly";
  const roll = new Roll({ notes: result.notes, seconds: result.seconds, given: result.span ? 0 : given,
    span: result.span,
    label: `Piano roll of ${name}: ${instruments.map(prettyLabel).join(", ") || "no notes"}` });
  card.querySelector(".card-body").replaceChildren(roll.el);
  const actions = card.querySelector(".card-actions");
  actions.replaceChildren(playButton(roll, result.notes, result.seconds, name),
    downloadLink("MIDI", result.midi_url, filename, `Download ${name} as MIDI`));
  if (result.wav_url) {
    actions.append(downloadLink("WAV", result.wav_url, filename.replace(/\.mid$/, ".wav"),
      `Download ${name} as audio rendered by the server`));
  }
  actions.append(...extra);
  return instruments;
}

function failCard(card, message) {
  card.dataset.state = "failed";
  card.querySelector(".progress-row").hidden = true;
  card.querySelector(".card-body").replaceChildren(el("p", { class: "card-note", text: message }));
}

// Runs one request into a set of cards; resolves to the results (or null if it failed or was cancelled).
export async function generateInto({ body, container, legend, status, button, cancelButton, given, filenameOf,
  extrasOf, heading, path = "/v1/generate", target = body.seconds }) {
  clearError();
  stopPlayback();
  const count = body.num_samples;
  const cards = Array.from({ length: count }, (_, i) => candidateCard(i, target));
  container.replaceChildren(...(heading ? [heading] : []), ...cards);
  container.dataset.state = "running";
  legend.replaceChildren();
  button.disabled = true;
  status.textContent = "Sending…";
  const job = startJob(body, path, {
    onQueued: (started) => { status.textContent = `Queued · seed ${started.seed}`; },
    onProgress: (update) => {
      const total = update.target_seconds || target;
      (update.progress || []).forEach((done, i) => cards[i] && cards[i].setProgress(done, total));
      status.textContent = "Writing music…";
    },
  });
  cancelButton.hidden = false;
  cancelButton.disabled = false;
  const onCancel = () => { cancelButton.disabled = true; status.textContent = "Cancelling…"; job.cancel(); };
  cancelButton.addEventListener("click", onCancel);
  try {
    const final = await job.done;
    if (final.status === "cancelled") {
      status.textContent = "Cancelled.";
      cards.forEach((card) => failCard(card, "Cancelled."));
      container.dataset.state = "cancelled";
      return null;
    }
    if (final.status === "failed") throw new ApiError(`Generation failed: ${final.error || "no reason given"}`);
    const results = final.results || [];
    const instruments = [];
    results.forEach((result) => {
      const card = cards[result.index] || cards[0];
      instruments.push(...fillCard(card, result, { given, filename: filenameOf(result, final),
        extra: extrasOf(result, final) }));
    });
    renderLegend(legend, instruments, instrumentOrder());
    status.textContent = `Done · seed ${final.seed}`;
    container.dataset.state = "done";
    return { results, seed: final.seed };
  } catch (e) {
    if (e.name === "AbortError") {
      status.textContent = "Cancelled.";
      cards.forEach((card) => failCard(card, "Cancelled."));
      container.dataset.state = "cancelled";
      return null;
    }
    status.textContent = "";
    cards.forEach((card) => failCard(card, "No piece: see the message above."));
    container.dataset.state = "failed";
    showError(e.message);
    return null;
  } finally {
    cancelButton.removeEventListener("click", onCancel);
    cancelButton.hidden = true;
    button.disabled = false;
  }
}
