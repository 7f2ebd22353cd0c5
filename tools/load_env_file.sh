# Source me: load_env_file FILE exports each KEY=VALUE of FILE unless KEY is already set in the environment,
# so a variable given on the command line always beats the file. Lines: KEY=VALUE, export KEY=VALUE, # comments.
load_env_file() {
  local line key value
  while IFS= read -r line || [ -n "$line" ]; do
    line="${line%%#*}"; line="${line#export }"
    line="$(echo "$line" | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')"
    [ -z "$line" ] && continue
    key="${line%%=*}"; value="${line#*=}"
    value="${value%\"}"; value="${value#\"}"; value="${value%\'}"; value="${value#\'}"
    if [ -z "${!key+x}" ]; then export "$key=$value"; fi
  done < "$1"
}
