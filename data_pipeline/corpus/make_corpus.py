r"""Regenerates `default_corpus.zip`, the MIDI corpus bundled for the `musenet_midi/default` dataset.

The zip holds `<label>/<name>.mid`; the top folder is the label the builder gives each file:

- `freedoom/`: every music lump (`D_*`) of Freedoom's two IWADs, as stored (they are MIDI files).
  BSD-3-Clause, (c) Contributors to the Freedoom project.
- `bach/`, `beethoven/`, `haydn/`, `mozart/`: scores of music21's core corpus (Bach's chorales,
  string quartets) written out as MIDI by music21. Public-domain compositions; the encodings are
  distributed with music21 (see LICENSES.md).

music21 is needed by this script only, not by the project. Steps (Debian/Ubuntu; music21 needs
about 30 CPU-minutes, mostly on the Beethoven quartets):

    apt-get download freedoom && dpkg -x freedoom_*.deb /tmp/freedoom_pkg      # 0.12.1-2
    python3 -m venv /tmp/m21 && /tmp/m21/bin/pip install music21==10.5.1
    /tmp/m21/bin/python data_pipeline/corpus/make_corpus.py --cache_dir /tmp/m21cache \
        --wad_dir /tmp/freedoom_pkg/usr/share/games/doom --out data_pipeline/corpus/default_corpus.zip

The zip is deterministic (sorted names, fixed timestamps, music21's output is stable) for a given
Freedoom and music21 version: with those two versions it comes out with sha256
01fa801e30b8a4a48b90ab1b1fab771f612792cd2a5de7029690803660962f3f. Scores music21 fails to convert
are reported and left out. `--cache_dir` keeps each converted score so an interrupted run resumes.
The script uses only the standard library and music21, so that it runs in music21's own environment.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import io
import os
import signal
import struct
import sys
import zipfile

# Which music21 corpus scores go in, by composer folder. Pieces are taken in MusicXML form (the
# corpus also holds Humdrum copies of a few of the same movements; one encoding per work).
MUSIC21_COMPOSERS = ("bach", "beethoven", "haydn", "mozart")
MUSIC21_SUFFIXES = (".mxl", ".xml", ".musicxml")
# Left out on purpose: not a chorale, and a MuseScore user's arrangement of unclear licence.
MUSIC21_EXCLUDE = {"bach/bwv846.mxl"}
WADS = ("freedoom1.wad", "freedoom2.wad")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def wad_music_lumps(path: str) -> dict[str, bytes]:
    """The `D_*` music lumps of a Doom WAD that are MIDI files: {lump name: bytes}.

    WAD layout: a 12-byte header (`IWAD`/`PWAD`, lump count, directory offset, little-endian int32)
    and a directory of 16-byte entries (data offset, size, 8-byte NUL-padded name).
    """
    with open(path, "rb") as f:
        data = f.read()
    magic, count, offset = struct.unpack_from("<4sii", data, 0)
    if magic not in (b"IWAD", b"PWAD") or count < 0 or not 0 <= offset <= len(data) - 16 * count:
        raise ValueError(f"{path}: not a WAD file")
    lumps = {}
    for i in range(count):
        pos, size, raw_name = struct.unpack_from("<ii8s", data, offset + 16 * i)
        name = raw_name.split(b"\0", 1)[0].decode("ascii", "replace")
        if not name.startswith("D_") or size <= 0 or pos < 0 or pos + size > len(data):
            continue
        lump = data[pos: pos + size]
        if lump[:4] == b"MThd":
            lumps[name] = lump
        else:  # DMX MUS lumps would need a MUS->MIDI converter; Freedoom ships MIDI.
            print(f"skipped {os.path.basename(path)}:{name}: not MIDI ({lump[:4]!r})", file=sys.stderr)
    return lumps


def music21_scores() -> list[str]:
    """Corpus paths (relative to music21's corpus folder) of the scores to convert."""
    from music21 import corpus

    chosen = []
    for composer in MUSIC21_COMPOSERS:
        for path in corpus.getComposer(composer):
            rel = str(path).replace(os.sep, "/").split("/corpus/", 1)[1]
            if not rel.lower().endswith(MUSIC21_SUFFIXES):
                continue
            if composer == "bach" and not rel.split("/")[-1].startswith("bwv"):
                continue  # chorales only (the folder also holds analyses)
            if rel not in MUSIC21_EXCLUDE:
                chosen.append(rel)
    return sorted(chosen)


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


def convert_score(rel: str, cache_dir: str | None = None,
                  timeout_s: int = 0) -> tuple[str, bytes | None, str]:
    """music21 corpus path -> (zip name, MIDI bytes or None, error). Runs in a worker process."""
    import music21
    from music21 import corpus, midi

    name = rel.rsplit(".", 1)[0] + ".mid"
    cached = None
    if cache_dir:
        cached = os.path.join(cache_dir, f"music21-{music21.__version__}", name)
        if os.path.isfile(cached):
            with open(cached, "rb") as f:
                return name, f.read(), ""
    if timeout_s:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(timeout_s)
    try:
        score = corpus.parse(rel)
        data = midi.translate.music21ObjectToMidiFile(score).writestr()
    except _Timeout:
        return name, None, f"took more than {timeout_s} s"
    except Exception as e:  # music21 raises many kinds; one bad score must not stop the run
        return name, None, f"{type(e).__name__}: {e}"
    finally:
        if timeout_s:
            signal.alarm(0)
    if cached:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        with open(cached + ".partial", "wb") as f:
            f.write(data)
        os.replace(cached + ".partial", cached)
    return name, data, ""


def write_zip(path: str, files: dict[str, bytes], comment: str) -> None:
    tmp = path + ".partial"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, files[name])
        zf.comment = comment.encode()
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wad_dir", required=True, help="folder holding freedoom1.wad and freedoom2.wad")
    parser.add_argument("--out", required=True, help="zip to write")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="music21 conversions at once")
    parser.add_argument("--cache_dir", help="keep each converted score here and reuse it on later runs")
    parser.add_argument("--timeout_s", type=int, default=0,
                        help="give up on a score after this many seconds (0: never); a score that times "
                             "out is left out, so the zip then depends on the machine's speed")
    args = parser.parse_args(argv)

    files: dict[str, bytes] = {}
    for wad in WADS:
        wad_path = os.path.join(args.wad_dir, wad)
        if not os.path.isfile(wad_path):
            parser.error(f"{wad_path} not found (see the steps in this script's docstring)")
        for lump, data in wad_music_lumps(wad_path).items():
            files[f"freedoom/{wad.split('.')[0]}_{lump}.mid"] = data

    import music21

    scores = music21_scores()
    failed = 0
    convert = functools.partial(convert_score, cache_dir=args.cache_dir, timeout_s=args.timeout_s)
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(convert, rel) for rel in scores]
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            name, data, error = future.result()
            if data is None:
                failed += 1
                print(f"\nskipped {name}: {error}", file=sys.stderr)
            else:
                files[name] = data
            print(f"\rmusic21: {i}/{len(scores)} scores", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    comment = (f"musenet-jax default corpus: Freedoom music lumps + music21 {music21.__version__} corpus "
               f"scores as MIDI; see LICENSES.md")
    write_zip(args.out, files, comment)
    counts = io.StringIO()
    for label in sorted({n.split("/")[0] for n in files}):
        counts.write(f" {label}={sum(n.startswith(label + '/') for n in files)}")
    print(f"wrote {args.out}: {len(files)} files ({os.path.getsize(args.out)} bytes);{counts.getvalue()}; "
          f"{failed} scores failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
