// The piano roll: a canvas drawing of a piece's notes (drums in a lane below), its playback cursor, a
// play / stop button over it, and the legend of instrument colours.
import { clamp, clearError, el, prettyLabel, showError } from "./dom.js";
import { play } from "./synth.js";

// -- instrument colours -----------------------------------------------------------------------------------
const COLOURS = {
  piano: "#f2c14e", violin: "#ef6f6c", cello: "#c9564f", bass: "#5b8def", guitar: "#57c785",
  flute: "#6fd6e6", clarinet: "#b392f0", trumpet: "#f59b3d", harp: "#f08cc8", drums: "#c7ccd6",
  primer: "#9aa3b5",
};

export function colourOf(instrument) {
  if (COLOURS[instrument]) return COLOURS[instrument];
  let hash = 0;
  for (const ch of String(instrument)) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
  return `hsl(${hash % 360} 70% 64%)`;
}


// -- piano roll -------------------------------------------------------------------------------------------
const NOTE_NAMES = ["C", "C♯", "D", "D♯", "E", "F", "F♯", "G", "G♯", "A", "A♯", "B"];
const BLACK = new Set([1, 3, 6, 8, 10]);

// Rows of the drum lane, low to high sound: kicks, snares and toms, hi-hats, cymbals, the rest.
function drumRow(pitch) {
  if (pitch === 35 || pitch === 36) return 0;
  if ((pitch >= 37 && pitch <= 41) || [43, 45, 47, 48, 50].includes(pitch)) return 1;
  if ([42, 44, 46].includes(pitch)) return 2;
  if ([49, 51, 52, 53, 55, 57, 59].includes(pitch)) return 3;
  return 4;
}

export class Roll {
  // notes: the API's note objects; seconds: the piece's length; given: seconds at the start that were
  // given (an opening or an earlier take), shaded so that the new part stands out.
  // span: [from, to] seconds of a rewritten stretch (an infilled take), shaded between dashed lines.
  constructor({ notes, seconds, given = 0, span = null, height = 170, label = "Piano roll" }) {
    this.notes = notes || [];
    this.seconds = Math.max(seconds || 0, ...this.notes.map((n) => n.end), 0.5);
    this.given = given;
    this.span = span;
    this.height = height;
    this.canvas = el("canvas", { class: "roll-canvas", role: "img", "aria-label": label });
    this.cursor = el("div", { class: "roll-cursor", hidden: true });
    this.el = el("div", { class: "roll", style: `height:${height}px` }, this.canvas, this.cursor);
    this.el.rollObject = this;
    this.width = 0;
    this.geometry = { left: 0, plotWidth: 1 };
    if (window.ResizeObserver) {
      new ResizeObserver(() => this.draw()).observe(this.el);
    } else {
      window.addEventListener("resize", () => this.draw());
    }
    requestAnimationFrame(() => this.draw());
  }

  draw() {
    const width = Math.round(this.el.clientWidth);
    if (!width) return;
    this.width = width;
    const height = this.height;
    const dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.round(width * dpr);
    this.canvas.height = Math.round(height * dpr);
    this.canvas.style.width = `${width}px`;
    this.canvas.style.height = `${height}px`;
    const g = this.canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);

    const pitched = this.notes.filter((n) => !n.drum);
    const drums = this.notes.filter((n) => n.drum);
    const left = 34;
    const right = 6;
    const axis = 16;
    const laneH = drums.length ? 30 : 0;
    const top = 4;
    const plotW = Math.max(10, width - left - right);
    const plotBottom = height - axis - (laneH ? laneH + 4 : 0);
    const plotH = Math.max(10, plotBottom - top);
    const x = (t) => left + (t / this.seconds) * plotW;
    this.geometry = { left, plotWidth: plotW };

    g.fillStyle = "#11131a";
    g.fillRect(0, 0, width, height);

    let lo = 60;
    let hi = 72;
    if (pitched.length) {
      lo = Math.min(...pitched.map((n) => n.pitch));
      hi = Math.max(...pitched.map((n) => n.pitch));
    }
    const span = Math.max(hi - lo + 1, 18);
    const extra = span - (hi - lo + 1);
    lo = Math.max(0, lo - Math.floor(extra / 2) - 1);
    hi = Math.min(127, lo + span + 1);
    const rowH = plotH / (hi - lo + 1);
    const y = (p) => top + (hi - p) * rowH;

    // Keyboard stripes and octave lines, so that pitches can be read off the roll.
    for (let p = lo; p <= hi; p++) {
      if (BLACK.has(p % 12)) {
        g.fillStyle = "#161922";
        g.fillRect(left, y(p), plotW, rowH);
      }
    }
    g.font = "10px system-ui, sans-serif";
    g.textBaseline = "middle";
    // Octave names need ~14 px each: on a crowded roll, every second (third...) octave is named.
    const labelOctaves = [1, 2, 3, 4, 6, 12].find((k) => rowH * 12 * k >= 14) || 12;
    for (let p = lo; p <= hi; p++) {
      if (p % 12 !== 0) continue;
      g.fillStyle = "#2a2f3c";
      g.fillRect(left, y(p) + rowH - 0.5, plotW, 1);
      if ((p / 12) % labelOctaves === 0) {
        g.fillStyle = "#8a91a0";
        g.fillText(`${NOTE_NAMES[0]}${p / 12 - 1}`, 4, y(p) + rowH / 2);
      }
    }

    // Time grid: a line a second (every 5 s stronger), labels spaced to fit.
    const stepChoices = [1, 2, 5, 10, 15, 30, 60];
    const labelStep = stepChoices.find((s) => (s / this.seconds) * plotW >= 46) || 60;
    g.textBaseline = "alphabetic";
    for (let t = 0; t <= this.seconds + 1e-6; t += 1) {
      const strong = t % 5 === 0;
      if (!strong && plotW / this.seconds < 12) continue;
      g.fillStyle = strong ? "#2c3140" : "#1d212c";
      g.fillRect(Math.round(x(t)), top, 1, plotBottom - top + (laneH ? laneH + 4 : 0));
      if (t % labelStep === 0) {
        g.fillStyle = "#8a91a0";
        g.textAlign = t === 0 ? "left" : x(t) > width - 14 ? "right" : "center";
        const text = t < 60 ? `${t}s` : `${Math.floor(t / 60)}:${String(t % 60).padStart(2, "0")}`;
        g.fillText(text, x(t), height - 4);
      }
    }
    g.textAlign = "left";

    if (this.span) {
      const [a, b] = this.span.map((t) => x(Math.min(t, this.seconds)));
      g.fillStyle = "rgba(242,193,78,0.08)";
      g.fillRect(a, top, b - a, height - axis - top);
      g.strokeStyle = "rgba(242,193,78,0.7)";
      g.setLineDash([4, 3]);
      for (const gx of [a, b]) {
        g.beginPath();
        g.moveTo(Math.round(gx) + 0.5, top);
        g.lineTo(Math.round(gx) + 0.5, height - axis);
        g.stroke();
      }
      g.setLineDash([]);
    }
    if (this.given > 0) {
      const gx = x(Math.min(this.given, this.seconds));
      g.fillStyle = "rgba(255,255,255,0.045)";
      g.fillRect(left, top, gx - left, height - axis - top);
      g.strokeStyle = "rgba(242,193,78,0.7)";
      g.setLineDash([4, 3]);
      g.beginPath();
      g.moveTo(Math.round(gx) + 0.5, top);
      g.lineTo(Math.round(gx) + 0.5, height - axis);
      g.stroke();
      g.setLineDash([]);
    }

    for (const n of pitched) {
      const nx = x(n.start);
      const nw = Math.max(2, x(n.end) - nx - 0.5);
      // Notes stay at least 3 px thick on a crowded roll, centred on their row, so that they read as notes.
      const h = Math.max(3, rowH - (rowH > 4 ? 1 : 0));
      const ny = y(n.pitch) + (rowH - h) / 2;
      g.globalAlpha = 0.55 + 0.45 * clamp(n.velocity / 127, 0, 1);
      g.fillStyle = colourOf(n.instrument);
      if (g.roundRect && h > 3) {
        g.beginPath();
        g.roundRect(nx, ny, nw, h, Math.min(2, h / 2));
        g.fill();
      } else {
        g.fillRect(nx, ny, nw, h);
      }
    }
    g.globalAlpha = 1;

    if (laneH) {
      const laneTop = plotBottom + 4;
      g.fillStyle = "#171a23";
      g.fillRect(left, laneTop, plotW, laneH);
      g.fillStyle = "#8a91a0";
      g.textBaseline = "middle";
      g.fillText("drums", 2, laneTop + laneH / 2);
      const rowStep = laneH / 5;
      for (const n of drums) {
        const cx = x(n.start);
        const cy = laneTop + laneH - rowStep * (drumRow(n.pitch) + 0.5);
        const r = 1.6 + 1.6 * clamp(n.velocity / 127, 0, 1);
        g.globalAlpha = 0.6 + 0.4 * clamp(n.velocity / 127, 0, 1);
        g.fillStyle = colourOf(n.instrument || "drums");
        g.beginPath();
        g.moveTo(cx, cy - r);
        g.lineTo(cx + r, cy);
        g.lineTo(cx, cy + r);
        g.lineTo(cx - r, cy);
        g.closePath();
        g.fill();
      }
      g.globalAlpha = 1;
    }

    if (!this.notes.length) {
      g.fillStyle = "#8a91a0";
      g.textAlign = "center";
      g.textBaseline = "middle";
      g.fillText("(silence)", left + plotW / 2, top + plotH / 2);
      g.textAlign = "left";
    }
    if (this.cursorTime !== undefined && this.cursorTime !== null) this.setCursor(this.cursorTime);
  }

  setCursor(t) {
    this.cursorTime = t;
    if (t === null || t === undefined) {
      this.cursor.hidden = true;
      return;
    }
    const px = this.geometry.left + (clamp(t, 0, this.seconds) / this.seconds) * this.geometry.plotWidth;
    this.cursor.hidden = false;
    this.cursor.style.transform = `translateX(${px.toFixed(1)}px)`;
    this.cursor.dataset.time = t.toFixed(2);
  }

  // The time under a click on the roll, for starting playback there.
  timeAt(clientX) {
    const box = this.el.getBoundingClientRect();
    return clamp((clientX - box.left - this.geometry.left) / this.geometry.plotWidth, 0, 1) * this.seconds;
  }
}

// A play / stop button over a roll: the cursor follows the sound; clicking the roll plays from there.
export function playButton(roll, notes, seconds, name) {
  const button = el("button", { type: "button", class: "button play", "aria-pressed": "false",
    "aria-label": `Play ${name}` }, el("span", { class: "play-icon", "aria-hidden": "true" }),
  el("span", { class: "play-text", text: "Play" }));
  const setPlaying = (on) => {
    button.setAttribute("aria-pressed", String(on));
    button.setAttribute("aria-label", `${on ? "Stop" : "Play"} ${name}`);
    button.classList.toggle("playing", on);
    button.querySelector(".play-text").textContent = on ? "Stop" : "Play";
    roll.el.classList.toggle("is-playing", on);
  };
  let handle = null;
  const start = (from) => {
    clearError();
    try {
      handle = play(notes, seconds, {
        from,
        owner: roll.el,
        onTime: (t) => roll.setCursor(t),
        onEnd: () => { handle = null; setPlaying(false); roll.setCursor(null); },
      });
      setPlaying(true);
    } catch (e) {
      showError(e.message);
    }
  };
  button.addEventListener("click", () => {
    if (handle) handle.stop();
    else start(0);
  });
  roll.el.addEventListener("click", (event) => start(roll.timeAt(event.clientX)));
  roll.el.title = "Click to play from here";
  return button;
}

// `order`: the model's instruments, in the order the legend lists them.
export function renderLegend(container, instruments, order = []) {
  container.replaceChildren();
  const rank = (name) => (order.includes(name) ? order.indexOf(name) : order.length);
  const names = [...new Set(instruments)].sort((a, b) => rank(a) - rank(b));
  if (!names.length) return;
  container.append(el("span", { class: "legend-title", text: "Colours:" }));
  for (const name of names) {
    container.append(el("span", { class: "legend-item" },
      el("span", { class: "swatch", style: `background:${colourOf(name)}` }), prettyLabel(name)));
  }
}
