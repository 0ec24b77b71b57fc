# Sourced by the pilot scripts: runs each of VARIANTS ("name|flags") as a
# plain `fedcmp run COMMON... flags --out OUT/name --fresh` (log in
# OUT/name.log), skipping finished ones (a summary.json in their folder)
# and, when names are given as arguments, every other one. Needs FEDCMP,
# OUT and the arrays COMMON and VARIANTS.
run_variants() {
  mkdir -p "$OUT"
  local wanted=("$@") line name flags out start
  for line in "${VARIANTS[@]}"; do
    name="${line%%|*}"
    flags="${line#*|}"
    if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " =~ " ${name} " ]]; then
      continue
    fi
    out="$OUT/$name"
    if ls "$out"/*/summary.json >/dev/null 2>&1; then
      echo "pilot $name: done already"
      continue
    fi
    echo "pilot $name: $flags"
    start=$(date +%s)
    # shellcheck disable=SC2086
    "$FEDCMP" run "${COMMON[@]}" $flags --out "$out" --fresh > "$out.log" 2>&1 || {
      echo "pilot $name failed; see $out.log"; continue; }
    echo "pilot $name: $(( $(date +%s) - start )) s"
  done
}
