#!/usr/bin/env bash
# Start the local Redis (with AOF) if nothing listens on its port yet. Sourced by run.sh and test.sh.
start_redis() {
  local port=$1 dir
  dir=$(mkdir -p "$2" && cd "$2" && pwd)
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    return 0
  fi
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --appendonly yes --daemonize yes \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --save ""
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "Redis did not start on port $port (see $dir/redis.log)" >&2
  return 1
}
