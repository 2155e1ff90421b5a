"""`python -m bench [--quick] [...]`: AGILLM vs Llama (`bench.compare_llama`, see it for the options).
`python -m bench decoding [--quick] [...]`: parallel decoding vs AR greedy (`bench.decoding`).
"""

import sys

from . import compare_llama, decoding


if __name__ == "__main__":
    if sys.argv[1:2] == ["decoding"]:
        decoding.main(sys.argv[2:])
    else:
        compare_llama.main()
