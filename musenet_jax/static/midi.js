// Reading MIDI files in the page, for an uploaded opening: its notes, instruments and length.

// -- MIDI files: enough of a reader to show an uploaded opening and know its length -----------------------
// General MIDI program -> MuseNet instrument class, as data_pipeline/instruments.py maps them.
const GM_CLASS = [[7, "piano"], [15, "piano"], [20, "piano"], [23, "clarinet"], [31, "guitar"], [39, "bass"],
  [41, "violin"], [42, "cello"], [43, "bass"], [45, "violin"], [46, "harp"], [47, "bass"], [54, "violin"],
  [55, "piano"], [63, "trumpet"], [71, "clarinet"], [87, "flute"], [95, "violin"], [103, "piano"],
  [107, "guitar"], [108, "harp"], [109, "clarinet"], [110, "violin"], [111, "clarinet"], [127, "piano"]];

export function parseMidi(bytes, known) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const text = (at) => String.fromCharCode(...bytes.subarray(at, at + 4));
  if (text(0) !== "MThd") throw new Error("not a MIDI file");
  const headerLength = view.getUint32(4);
  const tracks = view.getUint16(10);
  const division = view.getUint16(12);
  if (division & 0x8000) throw new Error("SMPTE time is not read here");
  const tempos = [];
  const events = [];
  let at = 8 + headerLength;
  for (let track = 0; track < tracks && at + 8 <= bytes.length; track++) {
    const length = view.getUint32(at + 4);
    if (text(at) !== "MTrk") { at += 8 + length; continue; }
    let i = at + 8;
    const end = Math.min(bytes.length, i + length);
    let tick = 0;
    let status = 0;
    const varint = () => {
      let value = 0;
      for (let k = 0; k < 4; k++) {
        const b = bytes[i++];
        value = (value << 7) | (b & 0x7f);
        if (!(b & 0x80)) break;
      }
      return value;
    };
    while (i < end) {
      tick += varint();
      let byte = bytes[i];
      if (byte & 0x80) { status = byte; i++; } else if (!status) throw new Error("bad running status");
      byte = status;
      if (byte === 0xff) {
        const type = bytes[i++];
        const size = varint();
        if (type === 0x51 && size === 3) tempos.push([tick, (bytes[i] << 16) | (bytes[i + 1] << 8) | bytes[i + 2]]);
        i += size;
        status = 0;
      } else if (byte === 0xf0 || byte === 0xf7) {
        i += varint();
        status = 0;
      } else {
        const kind = byte & 0xf0;
        const channel = byte & 0x0f;
        const a = bytes[i++];
        const b = kind === 0xc0 || kind === 0xd0 ? 0 : bytes[i++];
        events.push({ tick, kind, channel, a, b, track });
      }
    }
    at = end;
  }
  tempos.sort((x, y) => x[0] - y[0]);
  const segments = [[0, 0, 500000]];  // [tick, seconds at tick, microseconds per quarter]
  for (const [tick, tempo] of tempos) {
    const [t0, s0, q0] = segments[segments.length - 1];
    segments.push([tick, s0 + ((tick - t0) * q0) / division / 1e6, tempo]);
  }
  const seconds = (tick) => {
    let k = segments.length - 1;
    while (k > 0 && segments[k][0] > tick) k--;
    const [t0, s0, q0] = segments[k];
    return s0 + ((tick - t0) * q0) / division / 1e6;
  };
  events.sort((x, y) => x.tick - y.tick);
  const program = new Array(16).fill(0);
  const open = new Map();
  const notes = [];
  let last = 0;
  const classOf = (channel) => {
    if (channel === 9) return "drums";
    const name = GM_CLASS.find(([top]) => program[channel] <= top)[1];
    return known.includes(name) ? name : "primer";
  };
  for (const e of events) {
    const time = seconds(e.tick);
    last = Math.max(last, time);
    if (e.kind === 0xc0) program[e.channel] = e.a;
    const key = `${e.track}:${e.channel}:${e.a}`;
    if (e.kind === 0x90 && e.b > 0) {
      if (e.channel === 9) {
        notes.push({ instrument: "drums", pitch: e.a, velocity: e.b, start: time, end: time + 0.1, drum: true });
      } else {
        if (!open.has(key)) open.set(key, []);
        open.get(key).push({ instrument: classOf(e.channel), pitch: e.a, velocity: e.b, start: time, drum: false });
      }
    } else if (e.kind === 0x80 || (e.kind === 0x90 && e.b === 0)) {
      const stack = open.get(key);
      if (stack && stack.length) notes.push({ ...stack.shift(), end: time });
    }
  }
  for (const stack of open.values()) for (const n of stack) notes.push({ ...n, end: last });
  const instruments = [...new Set(notes.map((n) => n.instrument))].filter((n) => known.includes(n));
  return { seconds: Math.max(last, ...notes.map((n) => n.end), 0), notes, instruments };
}
