"""Temperature forecasting: RNN, LSTM and GRU against naive forecasts and (S)ARIMA.

(a) Synthetic daily temperatures 20 + 10 sin(0.1 t) + N(0, 2^2); windows of 7
    days; the last 20% of the days are the test part.
(b) Monthly El Nino sea-surface temperatures shipped with statsmodels,
    1950-2010; windows of 24 months (plus the month of year as sin/cos); the
    last 10 years are the test part.

Every forecast is one step ahead: a model sees the true values up to t - 1 and
predicts t. The networks read a window and are trained with the loss at its
last step (sequence-to-one). Their epoch is picked on a validation stretch just
before the test part; (S)ARIMA is fitted on everything before the test part and
then extended over it with the fitted parameters (``results.append``, no
refit), so its test predictions are one-step-ahead Kalman-filter forecasts.

  .venv/bin/python experiments/forecast.py            # a few minutes on 2 cores
  .venv/bin/python experiments/forecast.py --quick    # smoke test
"""

import argparse
import functools
import math
import warnings

import common  # noqa: F401  (puts the checkout on sys.path)
import jax
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import root_mean_squared_error
from statsmodels.tsa.arima.model import ARIMA

import bptt_jax
from bptt_jax.data import windows

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--seed", type=int, default=0, help="PRNG seed (noise, init, batch order)")
parser.add_argument("--repeats", type=int, default=3,
                    help="networks trained per cell (init and order keys folded from --seed)")
parser.add_argument("--cells", default="rnn,lstm,gru", help="comma-separated cells to train")
parser.add_argument("--hidden", type=int, default=32, help="hidden units H")
parser.add_argument("--epochs", type=int, default=120,
                    help="epochs; the params of the best on validation are kept")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
parser.add_argument("--max-norm", type=float, default=1.0, help="global-norm gradient clipping")
parser.add_argument("--points", type=int, default=800, help="length of the synthetic series")
parser.add_argument("--window", type=int, default=7, help="window of the synthetic series")
parser.add_argument("--elnino-window", type=int, default=24, help="months per El Nino window")
parser.add_argument("--test-years", type=int, default=10, help="El Nino years held out")
parser.add_argument("--val-frac", type=float, default=0.1,
                    help="fraction of the series before the test part used for validation")
parser.add_argument("--no-month", action="store_true",
                    help="El Nino: past values only, no month features")
parser.add_argument("--quick", action="store_true", help="tiny run for CI (seconds)")
parser.add_argument("--out", default=None, help="output directory (default results/forecast/)")
args = parser.parse_args()
if args.quick:
  args.cells, args.repeats, args.hidden, args.epochs, args.points = "lstm", 1, 8, 3, 300
  args.batch_size = 1024  # one full batch per epoch: fewer shapes to compile
out = common.results_dir("forecast", args.out)
key = jax.random.key(args.seed)
key_noise, key_nets = jax.random.split(key)

# Candidate (S)ARIMA orders, ((p, d, q), (P, D, Q, s)); the one with the lowest
# AIC on the training data is reported as "arima" (all are saved). AIC compares
# models on the same differenced data only loosely, so every candidate's test
# RMSE is printed too.
ARIMA_ORDERS = [((1, 0, 0), (0, 0, 0, 0)), ((2, 0, 1), (0, 0, 0, 0)), ((2, 0, 2), (0, 0, 0, 0))]
SARIMA_ORDERS = [((1, 0, 0), (1, 0, 0, 12)), ((2, 0, 0), (1, 0, 1, 12)), ((2, 0, 0), (0, 1, 1, 12))]
if args.quick:
  ARIMA_ORDERS, SARIMA_ORDERS = ARIMA_ORDERS[:1], SARIMA_ORDERS[:1]
CELLS = {name: {"rnn": bptt_jax.rnn, "lstm": bptt_jax.lstm, "gru": bptt_jax.gru}[name]
         for name in args.cells.split(",")}


# ----------------------------------------------------------------------------
# The model: a cell over the window, a linear readout of its last hidden state.

def init_model(cell, key, input_size):
  k_cell, k_out = jax.random.split(key)
  return {"cell": cell.init(k_cell, input_size),
          "out": bptt_jax.init_readout(k_out, cell.hidden_size, 1)}


def predict(cell, params, xs):
  """Windows ``[B, T, D]`` -> next values ``[B, 1]`` (normalized units)."""
  _, hs = bptt_jax.unroll(cell, params["cell"], xs)               # [B, T, H]
  return bptt_jax.readout(params["out"], bptt_jax.last_step(hs))  # [B, 1]


def loss_fn(cell, params, batch):
  return bptt_jax.final_loss(bptt_jax.mse(predict(cell, params, batch["xs"]), batch["ys"]))


def rmse_of(forecast, xs, truth, params):
  """RMSE (degrees) of ``forecast(params, xs)`` against ``truth``."""
  return root_mean_squared_error(truth, forecast(params, xs))


def train_networks(name, train, val, test, input_size, scale):
  """Trains every cell ``args.repeats`` times; returns test RMSEs, predictions, val curves.

  ``scale(y)`` maps normalized predictions back to degrees. Each run keeps the
  params of its epoch with the lowest validation RMSE.
  """
  tx = bptt_jax.optimizer(args.lr, max_norm=args.max_norm)
  steps_per_epoch = math.ceil(len(train["xs"]) / args.batch_size)
  batches = bptt_jax.data.shuffled_batches(train, args.batch_size)
  results = {}
  for cell_name, make_cell in CELLS.items():
    cell = make_cell(args.hidden)
    step = bptt_jax.train_step(lambda p, b, cell=cell: loss_fn(cell, p, b), tx,
                               max_norm=args.max_norm)
    forecast = jax.jit(lambda p, xs, cell=cell: scale(predict(cell, p, xs)[:, 0]))
    runs = []
    for r in range(args.repeats):
      k_init, k_data = jax.random.split(jax.random.fold_in(key_nets, r))
      keep = common.KeepBest(  # scored after every epoch; keeps the params of the best
          functools.partial(rmse_of, forecast, val["xs"], scale(val["ys"][:, 0])), "val_rmse",
          mode="min")
      state = bptt_jax.TrainState.create(init_model(cell, k_init, input_size), tx)
      bptt_jax.fit(step, state, batches, epochs=args.epochs, key=k_data, eval_fn=keep,
                   eval_every=steps_per_epoch, desc=f"{name} {cell_name} run {r}")
      preds = np.asarray(forecast(keep.params, test["xs"]))
      runs.append({"test_rmse": root_mean_squared_error(scale(test["ys"][:, 0]), preds),
                   "best_epoch": keep.index + 1, "val_rmse": keep.best,
                   "val_curve": keep.scores, "preds": preds})
    rmses = [run["test_rmse"] for run in runs]
    results[cell_name] = {
        "test_rmse_mean": float(np.mean(rmses)), "test_rmse_std": float(np.std(rmses)),
        "test_rmse_runs": rmses, "best_epochs": [run["best_epoch"] for run in runs],
        "val_rmse_runs": [run["val_rmse"] for run in runs],
        "preds": runs[0]["preds"], "val_curve": runs[0]["val_curve"]}
    print(f"  {cell_name:5s} test RMSE {np.mean(rmses):.3f} +- {np.std(rmses):.3f} "
          f"(runs {', '.join(f'{x:.3f}' for x in rmses)}; best epochs "
          f"{results[cell_name]['best_epochs']})")
  return results


def fit_arima(series, n_fit, orders):
  """Fits each order on ``series[:n_fit]``; one-step-ahead forecasts of ``series[n_fit:]``."""
  fits = {}
  for order, seasonal in orders:
    trend = "c" if order[1] == 0 and seasonal[1] == 0 else "n"  # no constant under differencing
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      res = ARIMA(series[:n_fit], order=order, seasonal_order=seasonal, trend=trend).fit()
      preds = res.append(series[n_fit:]).predict(start=n_fit, end=len(series) - 1)
    label = f"{order}x{seasonal}" if seasonal[3] else f"{order}"
    fits[label] = {"aic": float(res.aic), "preds": np.asarray(preds),
                   "test_rmse": root_mean_squared_error(series[n_fit:], preds),
                   "warnings": sorted({str(w.message) for w in caught})}
    print(f"  ARIMA{label:24s} trend={trend} AIC {res.aic:8.1f}  test RMSE "
          f"{fits[label]['test_rmse']:.3f}"
          + (f"  warnings: {fits[label]['warnings']}" if caught else ""))
  chosen = min(fits, key=lambda k: fits[k]["aic"])
  print(f"  chosen by AIC: ARIMA{chosen}")
  return chosen, fits


def saved(fits, nets):
  """What the JSON keeps of the (S)ARIMA candidates and the networks (no predictions)."""
  return {
      "arima_candidates": {k: {m: v[m] for m in ("aic", "test_rmse", "warnings")}
                           for k, v in fits.items()},
      "networks": {k: {m: v[m] for m in ("test_rmse_mean", "test_rmse_std", "test_rmse_runs",
                                         "best_epochs", "val_rmse_runs", "val_curve")}
                   for k, v in nets.items()}}


def split(xs, ys, n_test, n_val):
  """Chronological train / val / test split of windows (by the index of their target)."""
  n = len(ys)
  part = lambda lo, hi: {"xs": xs[lo:hi], "ys": ys[lo:hi]}  # noqa: E731
  n_train = n - n_test - n_val
  return part(0, n_train), part(n_train, n - n_test), part(n - n_test, n)


def plot_forecasts(path, title, t, truth, forecasts, xlabel, ylabel):
  fig, ax = plt.subplots(figsize=(10, 4))
  ax.plot(t, truth, "k.-", lw=1, ms=3, label="truth")
  for label, preds in forecasts.items():
    ax.plot(t, preds, lw=1, label=label)
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  ax.legend(fontsize=8, ncol=3)
  common.save_plot(fig, path)


figures = {}

# ----------------------------------------------------------------------------
# (a) Synthetic temperatures.

t = np.arange(args.points)
noise = 2.0 * np.asarray(jax.random.normal(key_noise, (args.points,)))
series = 20 + 10 * np.sin(0.1 * t) + noise
n_test = int(round(0.2 * args.points))
n_val = int(round(args.val_frac * (args.points - n_test)))
n_pre = args.points - n_test                    # points before the test part
mean, std = series[:n_pre - n_val].mean(), series[:n_pre - n_val].std()  # training part
xs, ys = windows((series - mean) / std, args.window)  # window i predicts series[i + window]
train, val, test = split(xs, ys, n_test, n_val)
print(f"(a) synthetic: {args.points} points, windows of {args.window}; "
      f"{len(train['ys'])} train / {len(val['ys'])} val / {len(test['ys'])} test windows")
truth = series[n_pre:]
with common.Timer() as t_nets:
  nets = train_networks("synthetic", train, val, test, 1, lambda y: y * std + mean)
naive = series[n_pre - 1:-1]
with common.Timer() as t_arima:
  chosen, arimas = fit_arima(series, n_pre, ARIMA_ORDERS)
print(f"  took {t_nets.seconds:.0f} s (networks) + {t_arima.seconds:.0f} s (ARIMA)")
test_rmse = {"naive_last_value": root_mean_squared_error(truth, naive),
             "arima": arimas[chosen]["test_rmse"],
             **{k: v["test_rmse_mean"] for k, v in nets.items()}}
print(f"  naive last-value test RMSE {test_rmse['naive_last_value']:.3f}; "
      "the noise std 2 is the floor")
figures["synthetic"] = {
    "test_rmse": test_rmse, "noise_std": 2.0, "arima_chosen": chosen, **saved(arimas, nets),
    "points": args.points, "window": args.window,
    "seconds": {"networks": t_nets.seconds, "arima": t_arima.seconds},
    "windows": {"train": len(train["ys"]), "val": len(val["ys"]), "test": len(test["ys"])}}
plot_forecasts(f"{out}/synthetic.png",
               "synthetic temperatures: one-step-ahead forecasts, test part", t[n_pre:], truth,
               {"naive": naive, f"ARIMA{chosen}": arimas[chosen]["preds"],
                **{k: v["preds"] for k, v in nets.items()}}, "day", "temperature")

# ----------------------------------------------------------------------------
# (b) El Nino sea-surface temperatures.

years, temps = bptt_jax.data.load_elnino()
month = np.rint((years % 1) * 12)
n_test = 12 * args.test_years
n_val = int(round(args.val_frac * (len(temps) - n_test)))
n_pre = len(temps) - n_test
mean, std = temps[:n_pre - n_val].mean(), temps[:n_pre - n_val].std()
xs, ys = windows((temps - mean) / std, args.elnino_window)
if not args.no_month:  # the month of each input step, as a point on the unit circle
  angle = 2 * np.pi * month / 12
  xs = np.concatenate([xs, windows(np.sin(angle), args.elnino_window)[0],
                       windows(np.cos(angle), args.elnino_window)[0]], axis=-1)
train, val, test = split(xs, ys, n_test, n_val)
print(f"(b) El Nino: {len(temps)} months {int(years[0])}-{int(years[-1])}; test = last "
      f"{args.test_years} years from {int(years[n_pre])}; windows of {args.elnino_window} months "
      f"x {xs.shape[-1]} features; {len(train['ys'])} train / {len(val['ys'])} val / "
      f"{len(test['ys'])} test windows")
truth = temps[n_pre:]
with common.Timer() as t_nets:
  nets = train_networks("elnino", train, val, test, xs.shape[-1], lambda y: y * std + mean)
seasonal_naive = temps[n_pre - 12:-12]
naive = temps[n_pre - 1:-1]
with common.Timer() as t_arima:
  chosen, sarimas = fit_arima(temps, n_pre, SARIMA_ORDERS)
print(f"  took {t_nets.seconds:.0f} s (networks) + {t_arima.seconds:.0f} s (SARIMA)")
test_rmse = {"seasonal_naive": root_mean_squared_error(truth, seasonal_naive),
             "naive_last_month": root_mean_squared_error(truth, naive),
             "sarima": sarimas[chosen]["test_rmse"],
             **{k: v["test_rmse_mean"] for k, v in nets.items()}}
print(f"  seasonal-naive (12 months earlier) test RMSE {test_rmse['seasonal_naive']:.3f} C; "
      f"naive last month {test_rmse['naive_last_month']:.3f} C")
for name, v in nets.items():
  below = sum(r < test_rmse["seasonal_naive"] for r in v["test_rmse_runs"])
  print(f"  {name}: below seasonal-naive in {below} of {len(v['test_rmse_runs'])} runs; "
        f"{v['test_rmse_mean']:.3f} vs SARIMA{chosen} {test_rmse['sarima']:.3f} C")
figures["elnino"] = {
    "test_rmse_celsius": test_rmse, "sarima_chosen": chosen, **saved(sarimas, nets),
    "test_years": [float(years[n_pre]), float(years[-1])], "window": args.elnino_window,
    "month_features": not args.no_month,
    "seconds": {"networks": t_nets.seconds, "sarima": t_arima.seconds},
    "windows": {"train": len(train["ys"]), "val": len(val["ys"]), "test": len(test["ys"])}}
plot_forecasts(f"{out}/elnino.png", "El Nino SST: one-step-ahead forecasts, held-out years",
               years[n_pre:], truth,
               {"seasonal naive": seasonal_naive, f"SARIMA{chosen}": sarimas[chosen]["preds"],
                **{k: v["preds"] for k, v in nets.items()}}, "year", "SST (C)")

common.write_json(f"{out}/forecast.json", figures, args)
