"""Character cards as files: the user's folder over the cards shipped with the package.

No database and no in-memory registry that could drift from disk: users drop card files into
their folder (``<data_dir>/characters`` by default) by hand, so every call looks at the folders
again (a parse cache keyed by file mtime/size only saves work). Names reach the filesystem, so
they are validated before any path is built; writes go through a temp file + ``os.replace`` so
a crash never leaves a half-written card behind.

The shipped cards (:data:`SHIPPED_CHARACTERS`, inside the package, so an installed wheel finds
them from any working directory) are only ever read: an upload of the same name goes to the
user's folder and shadows the shipped card, and deleting a shipped character records its name
in the user's folder (``.deleted.json``) instead of touching the file.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from kobold_api.chat.cards import PNG_SIGNATURE, CardError, character_to_v2_dict, parse_card
from kobold_api.chat.character import Character

logger = logging.getLogger(__name__)

SHIPPED_CHARACTERS = Path(__file__).resolve().parent / "shipped_cards"
DEFAULT_MAX_CARD_BYTES = 8 * 1024 * 1024
CARD_SUFFIXES = (".json", ".png", ".charx", ".yaml", ".yml")
MAX_NAME_LENGTH = 128
_FORBIDDEN_NAME_CHARS = frozenset('/\\:\0<>"|?*')
_TEMP_PREFIX = ".tmp-"
#: In the user's folder: stems (case-folded) of shipped characters the user deleted.
_DELETED_FILE = ".deleted.json"


class UnsafeNameError(ValueError):
    """A character name that could escape the folder or clash with hidden/temp files."""


class CardTooLargeError(CardError):
    """A card over the store's size limit (protects memory and disk from huge uploads)."""


class CharacterExistsError(ValueError):
    """Saving would replace an existing character and ``overwrite`` was not requested.

    Deliberately not a :class:`CardError`: the card is fine, only its name clashes (HTTP 409,
    not 400).
    """


def validate_name(name: object) -> str:
    """Return ``name`` if it is safe to use as a file stem, else raise :class:`UnsafeNameError`.

    Rejects path separators, ``..``, NUL and control characters, leading dots (hidden files,
    our temp files) and absolute paths, so ``folder / name`` can never leave the folder.
    """
    if not isinstance(name, str):
        raise UnsafeNameError("character name must be text")
    if not name or not name.strip():
        raise UnsafeNameError("character name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise UnsafeNameError(f"character name is longer than {MAX_NAME_LENGTH} characters")
    if name != name.strip():
        raise UnsafeNameError("character name must not start or end with spaces")
    if name.startswith("."):
        raise UnsafeNameError("character name must not start with a dot")
    if os.path.isabs(name) or any(ch in _FORBIDDEN_NAME_CHARS for ch in name):
        raise UnsafeNameError(
            "character name must not contain path separators or any of : < > \" | ? *"
        )
    if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in name):
        raise UnsafeNameError("character name must not contain control characters")
    return name


def safe_file_stem(card_name: str) -> str:
    """Derive a usable file stem from a card's own name (e.g. ``AC/DC`` → ``AC_DC``).

    Card names are the author's text, not an attack, so they are cleaned instead of refused;
    names given explicitly by a client are validated strictly instead.
    """
    cleaned = "".join(
        "_" if ch in _FORBIDDEN_NAME_CHARS or unicodedata.category(ch) in ("Cc", "Cf") else ch
        for ch in card_name
    )
    cleaned = cleaned.strip().lstrip(".").strip()[:MAX_NAME_LENGTH].strip()
    return cleaned or "character"


@dataclass(frozen=True)
class _CacheEntry:
    """A parsed card and the file stat it was parsed from."""

    mtime_ns: int
    size: int
    character: Character


class CharacterStore:
    """Lists, reads, saves and deletes cards in one folder, over the read-only ``shipped``
    folder; safe to share between threads."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_MAX_CARD_BYTES, shipped: Path | None = None) -> None:
        self.folder = Path(folder)
        self.shipped = Path(shipped) if shipped is not None else None
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self._cache: dict[Path, _CacheEntry] = {}

    # -- paths ----------------------------------------------------------------------------

    @staticmethod
    def _files_in(folder: Path | None) -> list[Path]:
        """Card files in ``folder``; hidden and temp files are never cards."""
        if folder is None or not folder.is_dir():
            return []
        return [path for path in folder.resolve().iterdir()
                if path.suffix.lower() in CARD_SUFFIXES and not path.name.startswith(".") and path.is_file()]

    def _card_files(self) -> list[Path]:
        """The user's cards and the shipped ones they neither shadow nor deleted, sorted."""
        own = self._files_in(self.folder)
        hidden = {path.stem.casefold() for path in own} | self._deleted()
        shipped = [path for path in self._files_in(self.shipped) if path.stem.casefold() not in hidden]
        return sorted(own + shipped, key=lambda p: p.name.lower())

    def _is_shipped(self, path: Path) -> bool:
        return self.shipped is not None and path.parent == self.shipped.resolve()

    def _deleted(self) -> set[str]:
        try:
            names = json.loads((self.folder / _DELETED_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return set()
        return {name for name in names if isinstance(name, str)} if isinstance(names, list) else set()

    def _path_for(self, stem: str, suffix: str) -> Path:
        """Build a path directly inside the folder, re-checking containment as a second guard.

        The file itself is not resolved: a symlinked card is replaced as a link, never followed.
        """
        validate_name(stem)
        root = self.folder.resolve()
        path = root / f"{stem}{suffix}"
        if path.parent != root or os.path.normpath(path) != str(path):
            raise UnsafeNameError("character name resolves outside the characters folder")
        return path

    def _files_with_stem(self, stem: str) -> list[Path]:
        """Existing card files whose stem matches case-insensitively (any suffix)."""
        wanted = stem.casefold()
        return [p for p in self._card_files() if p.stem.casefold() == wanted]

    # -- reading --------------------------------------------------------------------------

    def _load(self, path: Path) -> Character:
        """Parse one file, reusing the cached result while the file is unchanged."""
        stat = path.stat()
        cached = self._cache.get(path)
        if cached and cached.mtime_ns == stat.st_mtime_ns and cached.size == stat.st_size:
            return cached.character
        if stat.st_size > self.max_bytes:
            raise CardTooLargeError(
                f"{path.name} is {stat.st_size} bytes, over the {self.max_bytes}-byte limit"
            )
        character = parse_card(path.read_bytes(), filename_hint=path.name)
        self._cache[path] = _CacheEntry(stat.st_mtime_ns, stat.st_size, character)
        return character

    def _loaded(self) -> list[tuple[Path, Character]]:
        """Every readable card with its file; broken files are logged and skipped."""
        result: list[tuple[Path, Character]] = []
        files = self._card_files()
        for path in files:
            try:
                result.append((path, self._load(path)))
            except (CardError, OSError) as exc:
                logger.warning("skipping character file %s: %s", path.name, exc)
        live = set(files)
        for stale in [p for p in self._cache if p not in live]:
            del self._cache[stale]
        return result

    def list(self) -> list[Character]:
        """All loadable characters, sorted by name; one broken file never hides the others."""
        return [character for _, character in self.entries()]

    def entries(self) -> list[tuple[str, Character]]:
        """Every loadable character with its id (its file's stem: the name that always finds
        exactly this card, where two cards may carry the same name), sorted by name."""
        with self._lock:
            entries = [(path.stem, copy.deepcopy(c)) for path, c in self._loaded()]
        return sorted(entries, key=lambda entry: (entry[1].name.casefold(), entry[0].casefold()))

    def path_of(self, name: str) -> Path:
        """The file holding character ``name`` (file stem first, then card name)."""
        validate_name(name)
        wanted = name.casefold()
        with self._lock:
            by_stem = self._files_with_stem(name)
            for path in by_stem:
                try:
                    self._load(path)
                    return path
                except (CardError, OSError) as exc:
                    logger.warning("character file %s is unreadable: %s", path.name, exc)
            for path, character in self._loaded():
                if character.name.casefold() == wanted:
                    return path
        raise KeyError(name)

    def picture(self, name: str) -> bytes | None:
        """The card's picture: a PNG card's file is the character's image (the card rides in
        its text chunk); None for cards without one (JSON, YAML, CHARX)."""
        with self._lock:
            path = self.path_of(name)
            return path.read_bytes() if path.suffix.lower() == ".png" else None

    def picture_ids(self) -> set[str]:
        """The ids (file stems) of the characters that have a picture."""
        with self._lock:
            return {path.stem for path, _ in self._loaded() if path.suffix.lower() == ".png"}

    def is_shipped(self, name: str) -> bool:
        """Whether ``name`` finds a card shipped with the package (False for the user's cards
        and for names that find nothing)."""
        try:
            return self._is_shipped(self.path_of(name))
        except (KeyError, UnsafeNameError):
            return False

    def get(self, name: str) -> Character:
        """Character by file stem or card name, case-insensitively; ``KeyError`` if absent."""
        with self._lock:
            return copy.deepcopy(self._load(self.path_of(name)))

    # -- writing --------------------------------------------------------------------------

    def _atomic_write(self, path: Path, payload: bytes) -> None:
        """Write via a temp file in the same folder so readers never see a partial card."""
        fd, tmp_name = tempfile.mkstemp(dir=self.folder, prefix=_TEMP_PREFIX, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise

    def save(
        self,
        data: bytes,
        name: str | None = None,
        overwrite: bool = False,
        filename_hint: str | None = None,
    ) -> tuple[str, Character]:
        """Validate and store a card; PNG bytes are kept verbatim, everything else becomes V2 JSON.
        Returns the card's id (the file stem it was stored under) and the card.

        ``name`` (validated strictly) chooses the file stem; without it the card's own name is
        cleaned into one. Raises :class:`CardTooLargeError`, :class:`CardError`,
        :class:`UnsafeNameError` or :class:`CharacterExistsError`.
        """
        if len(data) > self.max_bytes:
            raise CardTooLargeError(
                f"card is {len(data)} bytes, over the {self.max_bytes}-byte limit"
            )
        if name is not None:
            validate_name(name)
        character = parse_card(bytes(data), filename_hint=filename_hint)
        stem = name if name is not None else safe_file_stem(character.name)
        is_png = bytes(data[:8]) == PNG_SIGNATURE
        suffix = ".png" if is_png else ".json"
        if is_png:
            payload = bytes(data)
        else:
            card = character_to_v2_dict(character)
            payload = (json.dumps(card, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
            if len(payload) > self.max_bytes:
                raise CardTooLargeError("card is over the size limit once stored as JSON")
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            target = self._path_for(stem, suffix)
            existing = self._files_with_stem(stem)
            if existing and not overwrite:
                raise CharacterExistsError(
                    f"a character named '{existing[0].stem}' already exists; "
                    "pass overwrite to replace it"
                )
            own = [old for old in existing if not self._is_shipped(old)]  # a shipped card is shadowed
            for old in own:  # keep the existing spelling ("Alice.json", not "alice.json")
                if old.suffix.lower() == suffix:
                    target = old
            self._atomic_write(target, payload)
            for old in own:  # e.g. replacing alice.png with alice.json
                if old != target:
                    old.unlink(missing_ok=True)
            self._cache.clear()
        return target.stem, character

    def delete(self, name: str) -> None:
        """Remove a character's file(s); ``KeyError`` if there is no such character.

        A file stem match is deleted even when the card inside is broken, so users can always
        clean up a bad upload. A shipped card is not touched: its name is recorded as deleted
        in the user's folder, and a shipped card of the same name under a user's upload goes too.
        """
        validate_name(name)
        with self._lock:
            paths = self._files_with_stem(name) or [self.path_of(name)]
            shipped = self._files_in(self.shipped)
            for path in paths:
                if self._is_shipped(path):
                    continue
                path.unlink(missing_ok=True)
                self._cache.pop(path, None)
            stems = {path.stem.casefold() for path in paths}
            if any(path.stem.casefold() in stems for path in shipped):
                self.folder.mkdir(parents=True, exist_ok=True)
                deleted = sorted(self._deleted() | stems)
                self._atomic_write(self.folder / _DELETED_FILE, json.dumps(deleted).encode("utf-8"))
