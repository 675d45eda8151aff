"""Files and flags: the one gate every input is read through (read.py) and the one atomic writer (write.py),
re-exported here, so ``from minbert.io import read_text_file, atomic_write_text`` is how the package reads and
writes; a full disk as one line (disk_full.py), one process per output folder (folder_lock.py), ``.bin`` weights
through ``torch.load(weights_only=True)`` (torch_load.py), where a user-named output may go (output_policy.py),
and settings declared as dataclass fields from which the flags are derived (settings.py)."""
from minbert.io.read import (BOM, DataError, check_finite, check_regular_file, comma_list, first_line, load_safetensors,
                             open_regular_file, parse_json, read_bytes_file, read_json_file, read_text_file)
from minbert.io.write import (PUBLISHED_MODE, TEMP_SUFFIX, AppendLog, atomic_open, atomic_path, atomic_save,
                              atomic_write_text, build_dir, finite_or_null, json_text, published_dir,
                              remove_stale_temps, replace_dir)

__all__ = ["AppendLog", "BOM", "DataError", "PUBLISHED_MODE", "TEMP_SUFFIX", "atomic_open", "atomic_path",
           "atomic_save", "atomic_write_text", "build_dir", "check_finite", "check_regular_file", "comma_list",
           "finite_or_null", "first_line", "json_text", "load_safetensors", "open_regular_file", "parse_json",
           "published_dir", "read_bytes_file", "read_json_file", "read_text_file", "remove_stale_temps",
           "replace_dir"]
