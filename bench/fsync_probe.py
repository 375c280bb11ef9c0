"""fdatasync latency of this disk, as the journal sees it: records of 600 bytes
appended to a file (what the journal does) or written over a file zeroed first,
each followed by fdatasync. With "bg", a thread writes, fsyncs and renames a
64 KiB file every 20 ms beside it (as ClickHouse does with its parts).

    python3 bench/fsync_probe.py DIR [N] [bg]
"""
import os, time, sys, threading
d = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
bg = len(sys.argv) > 3 and sys.argv[3] == "bg"
rec = b"x" * 600
stop = False
def background():
    i = 0
    while not stop:
        p = os.path.join(d, f"bg{i%50}.tmp")
        with open(p, "wb") as f:
            f.write(os.urandom(64 * 1024)); f.flush(); os.fsync(f.fileno())
        os.rename(p, p + ".done"); i += 1
        time.sleep(0.02)
if bg:
    t = threading.Thread(target=background, daemon=True); t.start()
def run(mode):
    p = os.path.join(d, f"seg-{mode}")
    if os.path.exists(p): os.unlink(p)
    fd = os.open(p, os.O_RDWR | os.O_CREAT)
    if mode == "zeroed":
        os.write(fd, b"\0" * (len(rec) * n + 4096)); os.fsync(fd); os.lseek(fd, 0, 0)
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        os.write(fd, rec); os.fdatasync(fd)
        lat.append(time.perf_counter() - t0)
    os.close(fd); os.unlink(p)
    lat.sort()
    q = lambda x: lat[min(len(lat)-1, int(x * len(lat)))] * 1e6
    print(f"{mode:7s} bg={bg} p50 {q(.5):6.0f} p90 {q(.9):6.0f} p99 {q(.99):6.0f} p99.9 {q(.999):6.0f} max {lat[-1]*1e6:6.0f} mean {sum(lat) / len(lat) * 1e6:5.0f} µs; >1ms {sum(1 for l in lat if l>1e-3)}")
for r in range(3):
    run("append"); run("zeroed")
stop = True
