"""Convert an original salesforce/ALBEF checkpoint into a Hub-ready transformers model folder.

    python convert/convert_albef_original_to_hf.py --checkpoint mscoco.pth --output-dir albef-retrieval-coco

The same as `albef convert` (`transformers_albef.cli.convert`, over the conversion core in
`transformers_albef.conversion`); `--help` lists the options.
"""

import sys

from transformers_albef.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
