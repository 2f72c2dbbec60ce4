#!/bin/bash
# Hostile and careless input, row by row: each command, its exit code, how many stderr lines
# it printed, whether one was a traceback, and its last stderr line; then what became of the
# user's files, the worker of a bench.memory sent SIGTERM, and the modes of written files.
# Run from anywhere: PYTHON=.venv/bin/python bash scripts/hostile_table.sh (as root, the
# unwritable-folder rows use chattr +i; otherwise they show what root may write).
cd "$(dirname "$0")/.."; PY=${PYTHON:-python}; W=$(mktemp -d)
trap 'chattr -i "$W/ro" 2>/dev/null; rm -rf "$W"' EXIT
row() { # name, command...
  local name="$1"; shift
  "$@" > $W/out.txt 2> $W/err.txt; local rc=$?
  printf '%s\n  $ %s\n  exit %s; stderr lines %s; traceback: %s\n  %s\n' "$name" "$*" "$rc" "$(wc -l < $W/err.txt)" "$(grep -c Traceback $W/err.txt)" "$(tail -n1 $W/err.txt | cut -c1-300)"
}
$PY -m histoseg.wsi.synth --out $W/s --slides 1 --size 3000x2000 --seed 3 >/dev/null 2>&1
SL=$W/s/slide_000.tif
$PY - "$W" <<'PY'
import sys
n=10**6
pts=[(10+2900*i/n, 10 if i%2==0 else 1900) for i in range(n)]
coords="".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}" />' for i,(x,y) in enumerate(pts))
open(sys.argv[1] + '/zig6.xml','w').write(f'<ASAP_Annotations><Annotations><Annotation Name="z" Type="Polygon" PartOfGroup="_0"><Coordinates>{coords}</Coordinates></Annotation></Annotations></ASAP_Annotations>')
n=10**5
pts=[(10+2900*i/n, 10 if i%2==0 else 1900) for i in range(n)]
coords="".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}" />' for i,(x,y) in enumerate(pts))
open(sys.argv[1] + '/zig5.xml','w').write(f'<ASAP_Annotations><Annotations><Annotation Name="z" Type="Polygon" PartOfGroup="_0"><Coordinates>{coords}</Coordinates></Annotation></Annotations></ASAP_Annotations>')
PY
ls -la $W/zig5.xml $W/zig6.xml | awk '{print $5, $9}'
for z in zig5 zig6; do
  /usr/bin/time -f "  peak RSS %M KB" $PY -m histoseg.wsi.patches --slide $SL --annotations $W/$z.xml --patch-size 256 --out $W/$z.csv > /dev/null 2> $W/err.txt; echo "$z: exit $?"; grep -v "^Command exited" $W/err.txt | tail -n2
done
row "patch size 1" $PY -m histoseg.wsi.patches --slide $SL --patch-size 1 --out $W/p1.csv
row "synth 10^6 x 10^6" $PY -m histoseg.wsi.synth --out $W/huge --slides 1 --size 1000000x1000000
mkdir -p $W/ro; chattr +i $W/ro 2>/dev/null && echo "  (chattr +i $W/ro)"
row "patches into an immutable folder" $PY -m histoseg.wsi.patches --slide $SL --patch-size 256 --out $W/ro/p.csv
row "bench.memory into an immutable folder" $PY -m bench.memory --sizes 128 --out $W/ro/m.json
chattr -i $W/ro 2>/dev/null
row "models --alpha nan" $PY -m histoseg.models --backbone mobilenetv2 --alpha nan
row "models --alpha inf" $PY -m histoseg.models --backbone mobilenetv2 --alpha inf
row "steptime --alpha nan" $PY -m histoseg.train.steptime --backbone mobilenetv2 --alpha nan
row "bench.accuracy --pixel-budget inf" $PY -m bench.accuracy --pixel-budget inf --out $W/acc.json
row "bench.memory --timeout-s nan" $PY -m bench.memory --sizes 128 --timeout-s nan --out $W/m.json
BAD=$(printf "$W/bad\xff.tif"); cp $SL "$BAD"
row "slide path with a non-UTF-8 byte (missing XML is fine: a run)" $PY -m histoseg.wsi.patches --slide "$BAD" --patch-size 512 --out $W/bad.csv
row "bench.memory --output-stride 7 --sizes 224" $PY -m bench.memory --output-stride 7 --sizes 224 --out $W/m.json
row "bench.memory --timeout-s 0" $PY -m bench.memory --sizes 128 --timeout-s 0 --out $W/m.json
row "bench.memory --timeout-s -1" $PY -m bench.memory --sizes 128 --timeout-s -1 --out $W/m.json
row "bench.accuracy --val-fraction 2" $PY -m bench.accuracy --val-fraction 2 --out $W/acc.json
row "bench.accuracy --val-fraction nan" $PY -m bench.accuracy --val-fraction nan --out $W/acc.json
row "bench.accuracy --synthetic-slides 0" $PY -m bench.accuracy --synthetic-slides 0 --out $W/acc.json
cp $SL $W/keep.tif; md5sum $W/keep.tif > $W/keep.md5
row "patches --out = --slide, --force" $PY -m histoseg.wsi.patches --slide $W/keep.tif --patch-size 256 --out $W/keep.tif --force
md5sum -c --quiet $W/keep.md5 && echo "  slide unchanged"
mkdir -p $W/mine; echo mine > $W/mine/slide_000.tif; echo mine > $W/mine/slide_000.xml
row "synth --out on the user's slide_000.tif/.xml" $PY -m histoseg.wsi.synth --out $W/mine --slides 1 --size 2000x2000
cat $W/mine/slide_000.tif $W/mine/slide_000.xml | tr '\n' ' '; echo " (user's files after)"
echo "a,b" > $W/side.csv
row "bench.memory --out side.json beside the user's side.csv" $PY -m bench.memory --sizes 128 --out $W/side.json
cat $W/side.csv
mkdir -p $W/plots; echo "my readme" > $W/plots/README.md
row "bench.plots --out on a folder with the user's README.md" $PY -m bench.plots --out $W/plots
cat $W/plots/README.md
row "--engine horovod without horovodrun" $PY -m histoseg.train --engine horovod --steps 1
row "synth --tile 7" $PY -m histoseg.wsi.synth --out $W/t7 --slides 1 --tile 7
ls -d $W/t7 2>&1 | sed 's/^/  /'
row "synth --mpp -1" $PY -m histoseg.wsi.synth --out $W/mpp --slides 1 --mpp -1
ls -d $W/mpp 2>&1 | sed 's/^/  /'
echo "SIGTERM to bench.memory"
$PY -m bench.memory --sizes 256 --steps 20 --out $W/sig.json > $W/sig.out 2> $W/sig.err & P=$!
for i in $(seq 60); do K=$(pgrep -P $P); [ -n "$K" ] && break; sleep 0.5; done; sleep 3
KIDS="$(pgrep -P $P) $(for k in $(pgrep -P $P); do pgrep -P $k; done)"; echo "  bench.memory $P, its worker group: $KIDS"
kill -TERM $P; wait $P; echo "  exit $?; $(tail -n1 $W/sig.err)"; sleep 1
for k in $KIDS; do kill -0 $k 2>/dev/null && echo "  pid $k still running"; done; echo "  left running: $(for k in $KIDS; do kill -0 $k 2>/dev/null && echo $k; done | wc -l)"; ls $W/sig.json 2>&1 | sed 's/^/  /'
$PY -m bench.plots --out $W/plots2 > /dev/null 2>&1; echo "modes (umask $(umask))"; stat -c "  %a %n" $W/s/* $W/plots2/* 2>/dev/null | head -12
