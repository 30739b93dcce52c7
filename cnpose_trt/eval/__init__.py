"""Measuring: accuracy (metrics: MPJPE, PA-MPJPE; datasets: synthetic people, Human3.6M; evaluate: engines
side by side on a set) and speed (bench). The commands' tables and files are cli.eval's and cli.bench's."""
