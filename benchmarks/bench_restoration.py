"""What do the classical restorers achieve on degraded radiographs? The baseline table a learned restorer must beat.

Validation films (the shared NIH subset when present, else the bundled sample; the held-out test patients moved out)
are degraded by every type and level of `restoration.LEVELS` (quantum noise at a dose, read noise, blur, downsampling
by 2 and 4, JPEG, low contrast), each film with its own seed. Each restorer of `restoration.BASELINES` (the degraded
input, scikit-image's non-local means, total variation and wavelet shrinkage, and bicubic interpolation for
downsampling) is tuned on half of the films (the best mean PSNR over its small grid) and measured on the other half.
It prints the table (type x level x method: PSNR, gain over the degraded input, SSIM, lesion-region SSIM, the tuned
parameters), the time taken, and one summary line: the best classical method per degradation type. Measured numbers,
not a test.

    .venv/bin/python benchmarks/bench_restoration.py                                   # 64 films at 128 px
    .venv/bin/python benchmarks/bench_restoration.py --size 64 --films 16 --kinds noise,jpeg
    .venv/bin/python benchmarks/bench_restoration.py --csv nbs/images/restoration_baselines.csv
"""
import argparse, time
from pathlib import Path

import pandas as pd

from cxr_diffusion_nbs.core import atomic_write
from cxr_diffusion_nbs.restoration import all_conditions, restoration_films, restoration_table, summary_line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', type=int, default=128, help='film size in pixels (default 128)')
    p.add_argument('--films', type=int, default=64, help='validation films in all: half tune, half are measured (default 64)')
    p.add_argument('--tune', type=int, default=None, help='of which tuning films (default half)')
    p.add_argument('--kinds', default=None, help='degradation types, comma-separated (default: all)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--split', default='val')
    p.add_argument('--csv', default=None, help='also write the table to this CSV file')
    a = p.parse_args(argv)
    conditions = all_conditions(a.kinds.split(',') if a.kinds else None)
    t0 = time.perf_counter()
    films = restoration_films(n=a.films, size=a.size, split=a.split)
    table = restoration_table(films['clean'], films['masks'], conditions=conditions, n_tune=a.tune, seed=a.seed)
    secs = time.perf_counter() - t0
    n_eval, n_lesion = int(table.n_films.iloc[0]), int(table.n_lesion.iloc[0])
    print(f"{films['source']}, split {a.split}: {a.films} films at {a.size} px, {a.films - n_eval} for tuning, "
          f"{n_eval} measured ({n_lesion} with a lesion outline); seed {a.seed}; {secs:.0f} s")
    with pd.option_context('display.width', 200, 'display.max_rows', 500):
        print(table.drop(columns=['n_films', 'n_lesion']).round(3).to_string(index=False))
    if a.csv:
        with atomic_write(Path(a.csv)) as tmp: table.round(4).to_csv(tmp, index=False)
        print('table written to', a.csv)
    print(summary_line(table))


if __name__ == '__main__':
    main()
