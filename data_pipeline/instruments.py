"""Instrument tables: how the 128 General MIDI programs (plus drums) map onto instrument classes.

A table is a tuple of class names (drums always last) and, for each of the 128 GM programs, the class
it falls into. Decoding writes each class with one representative GM program.

`musenet10` (the default) has MuseNet's ten classes. Its mapping of GM families (program numbers are
0-based):

| programs | GM family                                  | class                                   |
|----------|--------------------------------------------|-----------------------------------------|
| 0-7      | piano                                      | piano                                   |
| 8-15     | chromatic percussion (celesta .. dulcimer) | piano (struck, pitched, decaying)       |
| 16-20    | organs                                     | piano (keyboards)                       |
| 21-23    | accordion, harmonica, tango accordion      | clarinet (free reeds)                   |
| 24-31    | guitars                                    | guitar                                  |
| 32-39    | basses                                     | bass                                    |
| 40-41    | violin, viola                              | violin                                  |
| 42       | cello                                      | cello                                   |
| 43       | contrabass                                 | bass                                    |
| 44-45    | tremolo / pizzicato strings                | violin                                  |
| 46       | orchestral harp                            | harp                                    |
| 47       | timpani                                    | bass (low pitched percussion)           |
| 48-51    | string ensembles, synth strings            | violin                                  |
| 52-54    | choir aahs, voice oohs, synth voice        | violin (sustained melodic lines)        |
| 55       | orchestra hit                              | piano                                   |
| 56-63    | brass                                      | trumpet                                 |
| 64-71    | saxophones, double reeds, clarinet         | clarinet                                |
| 72-79    | pipes (piccolo .. ocarina)                 | flute                                   |
| 80-87    | synth leads                                | flute (monophonic melodic leads)        |
| 88-95    | synth pads                                 | violin (sustained)                      |
| 96-103   | synth effects                              | piano                                   |
| 104-107  | sitar, banjo, shamisen, koto               | guitar (plucked)                        |
| 108      | kalimba                                    | harp                                    |
| 109      | bagpipe                                    | clarinet                                |
| 110      | fiddle                                     | violin                                  |
| 111      | shanai                                     | clarinet                                |
| 112-127  | percussive, sound effects                  | piano                                   |

Anything on MIDI channel 10 is `drums`, whatever its program.

`gm` keeps every GM program as its own class (named after the GM program, snake_case) plus `drums`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

DRUMS = "drums"

GM_PROGRAM_NAMES: tuple[str, ...] = (
    "acoustic_grand_piano", "bright_acoustic_piano", "electric_grand_piano", "honky_tonk_piano",
    "electric_piano_1", "electric_piano_2", "harpsichord", "clavinet",
    "celesta", "glockenspiel", "music_box", "vibraphone",
    "marimba", "xylophone", "tubular_bells", "dulcimer",
    "drawbar_organ", "percussive_organ", "rock_organ", "church_organ",
    "reed_organ", "accordion", "harmonica", "tango_accordion",
    "acoustic_guitar_nylon", "acoustic_guitar_steel", "electric_guitar_jazz", "electric_guitar_clean",
    "electric_guitar_muted", "overdriven_guitar", "distortion_guitar", "guitar_harmonics",
    "acoustic_bass", "electric_bass_finger", "electric_bass_pick", "fretless_bass",
    "slap_bass_1", "slap_bass_2", "synth_bass_1", "synth_bass_2",
    "violin", "viola", "cello", "contrabass",
    "tremolo_strings", "pizzicato_strings", "orchestral_harp", "timpani",
    "string_ensemble_1", "string_ensemble_2", "synth_strings_1", "synth_strings_2",
    "choir_aahs", "voice_oohs", "synth_voice", "orchestra_hit",
    "trumpet", "trombone", "tuba", "muted_trumpet",
    "french_horn", "brass_section", "synth_brass_1", "synth_brass_2",
    "soprano_sax", "alto_sax", "tenor_sax", "baritone_sax",
    "oboe", "english_horn", "bassoon", "clarinet",
    "piccolo", "flute", "recorder", "pan_flute",
    "blown_bottle", "shakuhachi", "whistle", "ocarina",
    "lead_1_square", "lead_2_sawtooth", "lead_3_calliope", "lead_4_chiff",
    "lead_5_charang", "lead_6_voice", "lead_7_fifths", "lead_8_bass_lead",
    "pad_1_new_age", "pad_2_warm", "pad_3_polysynth", "pad_4_choir",
    "pad_5_bowed", "pad_6_metallic", "pad_7_halo", "pad_8_sweep",
    "fx_1_rain", "fx_2_soundtrack", "fx_3_crystal", "fx_4_atmosphere",
    "fx_5_brightness", "fx_6_goblins", "fx_7_echoes", "fx_8_sci_fi",
    "sitar", "banjo", "shamisen", "koto",
    "kalimba", "bagpipe", "fiddle", "shanai",
    "tinkle_bell", "agogo", "steel_drums", "woodblock",
    "taiko_drum", "melodic_tom", "synth_drum", "reverse_cymbal",
    "guitar_fret_noise", "breath_noise", "seashore", "bird_tweet",
    "telephone_ring", "helicopter", "applause", "gunshot",
)
assert len(GM_PROGRAM_NAMES) == 128


def _musenet10_program_classes() -> tuple[str, ...]:
    ranges = [
        (0, 21, "piano"), (21, 24, "clarinet"), (24, 32, "guitar"), (32, 40, "bass"),
        (40, 42, "violin"), (42, 43, "cello"), (43, 44, "bass"), (44, 46, "violin"),
        (46, 47, "harp"), (47, 48, "bass"), (48, 55, "violin"), (55, 56, "piano"),
        (56, 64, "trumpet"), (64, 72, "clarinet"), (72, 88, "flute"), (88, 96, "violin"),
        (96, 104, "piano"), (104, 108, "guitar"), (108, 109, "harp"), (109, 110, "clarinet"),
        (110, 111, "violin"), (111, 112, "clarinet"), (112, 128, "piano"),
    ]
    classes = [""] * 128
    for lo, hi, name in ranges:
        for program in range(lo, hi):
            classes[program] = name
    assert all(classes), "every GM program needs a class"
    return tuple(classes)


@dataclasses.dataclass(frozen=True)
class InstrumentSet:
    """Instrument classes and the GM program -> class mapping.

    Attributes:
      name: table name (`musenet10` or `gm`).
      names: class names; `drums` is always the last one.
      program_class: int32[128], class index of each GM program (never the drums index).
      class_program: GM program written for each pitched class when decoding (drums: 0).
    """

    name: str
    names: tuple[str, ...]
    program_class: np.ndarray
    class_program: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def drums_index(self) -> int:
        return len(self.names) - 1

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(
                f"unknown instrument {name!r}; valid: {', '.join(self.names)}"
            ) from None


def _build(name: str) -> InstrumentSet:
    if name == "musenet10":
        names = ("piano", "violin", "cello", "bass", "guitar", "flute", "clarinet", "trumpet",
                 "harp", DRUMS)
        per_program = _musenet10_program_classes()
        program_class = np.array([names.index(c) for c in per_program], np.int32)
        representative = {"piano": 0, "violin": 40, "cello": 42, "bass": 32, "guitar": 24,
                          "flute": 73, "clarinet": 71, "trumpet": 56, "harp": 46, DRUMS: 0}
        class_program = tuple(representative[n] for n in names)
    elif name == "gm":
        names = GM_PROGRAM_NAMES + (DRUMS,)
        program_class = np.arange(128, dtype=np.int32)
        class_program = tuple(range(128)) + (0,)
    else:
        raise ValueError(f"unknown instrument set {name!r}; valid: musenet10, gm")
    program_class.setflags(write=False)
    return InstrumentSet(name, names, program_class, class_program)


INSTRUMENT_SETS: dict[str, InstrumentSet] = {n: _build(n) for n in ("musenet10", "gm")}


def get_instrument_set(name: str) -> InstrumentSet:
    if name not in INSTRUMENT_SETS:
        raise ValueError(f"unknown instrument set {name!r}; valid: {', '.join(INSTRUMENT_SETS)}")
    return INSTRUMENT_SETS[name]
