"""`l4lb import`: keepalived.conf and haproxy.cfg to an l4lb config, with a report of what differs.

keepalived.py / haproxy.py read the files (grammar only); kaconvert.py (with
kavrrp.py, kalvs.py, kabase.py) and haconvert.py map them onto the l4lb config
model; emit.py writes the commented TOML; convert.py ties it together and
validates the result with l4lb.config. The report (report.py) lists, with file and
line, every setting that was dropped or changes meaning.
"""

from l4lb.importer.common import Options
from l4lb.importer.convert import FORMATS, Result, detect_format, import_files
from l4lb.importer.report import CHANGED, NOTE, UNSUPPORTED, Finding, ImportFailed, Report

__all__ = ["Options", "FORMATS", "Result", "detect_format", "import_files", "ImportFailed", "Report",
           "Finding", "CHANGED", "NOTE", "UNSUPPORTED"]
