"""The slash commands of `dgrun chat`: /help /clear /exit /save /load /stats /set."""

from __future__ import annotations

from dgrun.cli.output import plural
from dgrun.errors import DgrunError

HELP = """commands:
  /help             this list
  /clear            forget the conversation (the system prompt stays) and empty the KV cache
  /exit             quit (also Ctrl-D)
  /save FILE        write the conversation to FILE (JSON)
  /load FILE        read a conversation saved with /save and encode it into a new cache
  /stats            KV-cache reuse and speed of the last turn and of the session
  /set KEY VALUE    change a setting: n, steps, temp (t_min = t_max; 0 is greedy), t_max, t_min,
                    entropy_bound, stability, confidence, seed, visual on|off, trim_repeats on|off, system TEXT
Ctrl-C stops the current answer and keeps the conversation."""

# /set names -> (Model.generate knob, type)
KNOBS = {"n": ("max_new_tokens", int), "n_predict": ("max_new_tokens", int), "max_new_tokens": ("max_new_tokens", int),
         "steps": ("steps", int), "t_max": ("t_max", float), "t_min": ("t_min", float),
         "entropy_bound": ("entropy_bound", float), "stability": ("stability_threshold", int),
         "stability_threshold": ("stability_threshold", int), "confidence": ("confidence_threshold", float),
         "confidence_threshold": ("confidence_threshold", float), "seed": ("seed", int),
         "temp": ("temp", float), "temperature": ("temp", float)}
SWITCHES = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
EXIT = object()


def stats_lines(chat) -> list[str]:
    tot = chat.totals()
    lines = [f"context: {tot['context_tokens']} tokens in the KV cache"]
    if chat.turns:
        t = chat.turns[-1]
        lines.append(f"last turn: encoded {t.new_tokens} new tokens, reused {t.reused_tokens} from the cache "
                     f"(a stateless turn encodes {t.full_prompt_tokens}); then committed {t.committed_tokens} "
                     f"answer/end-of-turn tokens; prefill {t.prefill_seconds * 1000:.1f} ms"
                     + ("; cache rebuilt" if t.rebuilt else ""))
        if t.gen is not None:
            g = t.gen
            lines.append(f"answer: {plural(len(g.ids), 'token')}, {plural(g.blocks, 'block')}, steps/block {g.avg_steps:.1f}, "
                         f"tokens/forward {g.tokens_per_forward:.2f}, {g.tokens_per_second:.1f} tok/s")
    lines.append(f"session: {plural(tot['turns'], 'turn')}, encoded {tot['encoded_prompt_tokens']} prompt tokens instead of "
                 f"{tot['stateless_prompt_tokens']} ({tot['saved']:.0%} reused from the cache)")
    return lines


class Commands:
    """Runs one slash command line; `say` prints a line of output, `settings` holds visual on/off."""

    def __init__(self, chat, say, settings: dict):
        self.chat, self.say, self.settings = chat, say, settings

    def run(self, line: str):
        name, _, arg = line[1:].strip().partition(" ")
        handler = getattr(self, "cmd_" + name.lower(), None) if name.isidentifier() else None
        if handler is None:
            raise DgrunError(f"unknown command /{name} (try /help)")
        return handler(arg.strip())

    def cmd_help(self, arg):
        for line in HELP.splitlines():
            self.say(line)

    def cmd_exit(self, arg):
        return EXIT

    cmd_quit = cmd_exit

    def cmd_clear(self, arg):
        self.chat.clear()
        self.say("conversation cleared")

    def cmd_stats(self, arg):
        for line in stats_lines(self.chat):
            self.say(line)

    def _path(self, arg, verb):
        if not arg:
            raise DgrunError(f"usage: /{verb} FILE")
        return arg

    def cmd_save(self, arg):
        path = self._path(arg, "save")
        self.chat.save(path)
        self.say(f"saved {len(self.chat.history)} messages to {path}")

    def cmd_load(self, arg):
        path = self._path(arg, "load")
        n = self.chat.load(path)
        self.say(f"loaded {len(self.chat.history)} messages from {path} ({n} tokens encoded)")

    def cmd_set(self, arg):
        key, _, value = arg.partition(" ")
        key, value = key.lower().replace("-", "_"), value.strip()
        if not key or not value:
            raise DgrunError("usage: /set KEY VALUE (see /help)")
        if key == "system":
            self.chat.system = value
            self.say("system prompt set (the cache is rebuilt on the next turn)")
        elif key in ("visual", "trim_repeats"):
            if value.lower() not in SWITCHES:
                raise DgrunError(f"/set {key} takes on or off")
            if key == "visual":
                self.settings["visual"] = SWITCHES[value.lower()]
            else:
                self.chat.trim_repeats = SWITCHES[value.lower()]
            self.say(f"{key} {'on' if SWITCHES[value.lower()] else 'off'}")
        elif key in KNOBS:
            knob, kind = KNOBS[key]
            try:
                parsed = kind(value)
            except ValueError:
                wanted = "an integer" if kind is int else "a number"
                raise DgrunError(f"/set {key} takes {wanted}, got {value!r}") from None
            changes = {"t_min": parsed, "t_max": parsed} if knob == "temp" else {knob: parsed}
            self.chat.model.config(**{**self.chat.knobs, **changes})  # validates the value
            self.chat.knobs.update(changes)
            self.say(", ".join(f"{k} = {v}" for k, v in changes.items()))
        else:
            raise DgrunError(f"/set: unknown setting {key!r} (see /help)")
