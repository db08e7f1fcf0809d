"""python playground.py [--model DIR] [--host 127.0.0.1] [--port 7860]

Chat with a medm model about a 2D image or a 3D volume in the browser (the same as `medm playground`). With no
`--model` it serves the demo checkpoint (runs/demo/finetune), training it first when missing. Options:
`python playground.py --help`; the code is in medm/playground/.
"""

import sys

from medm.playground.cli import main

if __name__ == "__main__":
    sys.exit(main())
