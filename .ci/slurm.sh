#!/usr/bin/env bash
# Bring up / tear down a real single-node Slurm cluster on this machine (Debian 12, root, no
# systemd), so the Slurm job-array integration test can submit real `sbatch --array` jobs.
#
# Usage (stdout of `up` is only `export` lines; every diagnostic goes to stderr):
#   eval "$(bash .ci/slurm.sh up)"     # installs slurm-wlm + munge if missing, starts the daemons,
#                                      # waits for the node to be idle; prints SCORECAM_SLURM=1
#   bash .ci/slurm.sh down             # stops slurmd, slurmctld, munged by their pidfiles
#
# `up` is idempotent: with the cluster already running it only prints the export lines again.
# `down` never fails when nothing runs. Both cope with leftovers of an earlier session (stale
# pidfiles, saved controller state): the controller is started with -c (clear saved state).
set -euo pipefail

# Everything goes to stderr except the export lines, which go to the original stdout (fd 3).
exec 3>&1 1>&2

say() { echo "slurm.sh: $*" >&2; }

SLURM_CONF_FILE=/etc/slurm/slurm.conf  # Debian's compiled-in default: sbatch etc. need no env
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_PID="$RUN_DIR/slurmctld.pid"
SLURMD_PID="$RUN_DIR/slurmd.pid"
CTLD_LOG="$LOG_DIR/slurmctld.log"
SLURMD_LOG="$LOG_DIR/slurmd.log"
MUNGE_RUN=/run/munge
MUNGE_PID="$MUNGE_RUN/munged.pid"
MUNGE_LOG=/var/log/munge/munged.log
PARTITION=ci
READY_TIMEOUT_S="${SCORECAM_SLURM_TIMEOUT_S:-90}"

print_exports() {
    printf 'export SCORECAM_SLURM=1\n' >&3
    printf 'export SLURM_CONF=%q\n' "$SLURM_CONF_FILE" >&3
}

# pid_alive PIDFILE NAME: the pidfile names a live process whose command is NAME (guards against a
# stale pidfile whose PID was reused by something else).
pid_alive() {
    local pidfile="$1" name="$2" pid comm
    [ -s "$pidfile" ] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [ -n "$pid" ] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    # Debian installs slurmd/slurmctld as alternatives of slurmd-wlm/slurmctld-wlm.
    [ "$comm" = "$name" ] || [ "$comm" = "$name-wlm" ]
}

pid_of() { tr -dc '0-9' <"$1"; }

# stop_pidfile PIDFILE NAME: SIGTERM, wait up to 20 s, then SIGKILL; silent if not running.
stop_pidfile() {
    local pidfile="$1" name="$2" pid i
    if ! pid_alive "$pidfile" "$name"; then
        rm -f "$pidfile"
        return 0
    fi
    pid="$(pid_of "$pidfile")"
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        [ -d "/proc/$pid" ] || break
        sleep 0.2
    done
    if [ -d "/proc/$pid" ]; then
        say "$name (pid $pid) still running after 20 s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do
            [ -d "/proc/$pid" ] || break
            sleep 0.1
        done
    fi
    rm -f "$pidfile"
}

# start_detached NAME CMD...: run a self-daemonizing command with stdin/stdout from /dev/null,
# stderr to $LOG_DIR/NAME.start.log (echoed to our stderr afterwards) and EVERY other inherited file
# descriptor closed. munged keeps inherited descriptors open: without this, the pipe of a caller's
# `$(bash .ci/slurm.sh up)` stays open in munged and the command substitution never returns.
start_detached() {
    local name="$1" startlog rc=0
    shift
    startlog="$LOG_DIR/$name.start.log"
    mkdir -p "$LOG_DIR"
    (
        for fd in $(ls /proc/"$BASHPID"/fd); do
            if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
        done
        exec "$@"
    ) </dev/null >"$startlog" 2>&1 || rc=$?
    if [ -s "$startlog" ]; then
        sed "s/^/$name: /" "$startlog" >&2 || true
    fi
    return "$rc"
}

diagnostics() {
    say "---- diagnostics ----"
    for f in "$MUNGE_LOG" "$LOG_DIR"/*.start.log "$CTLD_LOG" "$SLURMD_LOG"; do
        if [ -r "$f" ]; then
            say "---- last lines of $f ----"
            tail -n 30 "$f" >&2 || true
        else
            say "---- $f: missing ----"
        fi
    done
    say "---- $SLURM_CONF_FILE ----"
    cat "$SLURM_CONF_FILE" >&2 2>/dev/null || true
    say "---- sinfo ----"
    timeout 10 sinfo -N -l >&2 2>&1 || true
    timeout 10 scontrol show node >&2 2>&1 || true
    say "---- processes ----"
    ps -eo pid,user,args | grep -E '[s]lurm|[m]unge' >&2 || true
}

die() {
    say "ERROR: $*"
    diagnostics
    exit 1
}

install_packages() {
    if command -v sbatch >/dev/null 2>&1 && command -v slurmctld >/dev/null 2>&1 \
        && command -v slurmd >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
        return 0
    fi
    say "installing slurm-wlm and munge from Debian's packages"
    apt-get update -qq >&2
    # policy-rc.d (where present) keeps the packages' init scripts from starting daemons; if one
    # does start anyway, its pidfile is the one used below, so `up` adopts it and `down` stops it.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge >&2
    command -v sbatch >/dev/null 2>&1 && command -v slurmctld >/dev/null 2>&1 \
        && command -v slurmd >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 \
        || die "slurm-wlm/munge installed but sbatch/slurmctld/slurmd/munged not on PATH"
}

start_munge() {
    id munge >/dev/null 2>&1 || die "user munge does not exist (munge package broken?)"
    install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null 2>&1; then
            runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key >&2
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key

    if pid_alive "$MUNGE_PID" munged && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    stop_pidfile "$MUNGE_PID" munged
    rm -f "$MUNGE_RUN"/munge.socket.2 "$MUNGE_RUN"/munge.socket.2.lock
    say "starting munged"
    start_detached munged runuser -u munge -- /usr/sbin/munged \
        --pid-file="$MUNGE_PID" --log-file="$MUNGE_LOG" || die "munged failed to start"
    local i
    for i in $(seq 1 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    die "munge -n | unmunge does not work 10 s after starting munged"
}

write_config() {
    local host nodeline cfg tmp mem mem_cfg
    # slurmd names its node after the short hostname; use slurmd -C's own view of this machine.
    nodeline="$(slurmd -C 2>/dev/null | head -n1)"
    case "$nodeline" in
        NodeName=*) ;;
        *) die "slurmd -C printed no NodeName line: '$nodeline'" ;;
    esac
    host="$(printf '%s\n' "$nodeline" | sed -E 's/^NodeName=([^ ]+).*/\1/')"
    # Configure a little less memory than slurmd sees, so that a few MB of drift between boots
    # never drains the node as "Low RealMemory". Memory is not a consumable resource (CR_Core), so
    # jobs that request no memory always fit.
    mem="$(printf '%s\n' "$nodeline" | sed -nE 's/.*RealMemory=([0-9]+).*/\1/p')"
    if [ -n "$mem" ]; then
        mem_cfg=$((mem * 95 / 100))
        [ "$mem_cfg" -ge 1 ] || mem_cfg=1
        nodeline="$(printf '%s\n' "$nodeline" | sed -E "s/RealMemory=[0-9]+/RealMemory=$mem_cfg/")"
    fi
    # NodeAddr / SlurmctldHost address 127.0.0.1: the daemons never need the hostname to resolve.
    cfg="# Written by .ci/slurm.sh: single-node CI cluster.
ClusterName=scorecam-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=300
$nodeline NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
"
    mkdir -p "$(dirname "$SLURM_CONF_FILE")"
    if [ -f "$SLURM_CONF_FILE" ] && [ "$(cat "$SLURM_CONF_FILE")" = "$(printf '%s' "$cfg")" ]; then
        CONFIG_CHANGED=0
    else
        tmp="$SLURM_CONF_FILE.tmp.$$"
        printf '%s' "$cfg" >"$tmp"
        chmod 0644 "$tmp"
        mv -f "$tmp" "$SLURM_CONF_FILE"
        CONFIG_CHANGED=1
        say "wrote $SLURM_CONF_FILE"
    fi
    NODE_NAME="$host"
}

node_state() {
    timeout 10 sinfo -h -N -n "$NODE_NAME" -o %t 2>/dev/null | head -n1 | tr -d '[:space:]'
}

wait_ready() {
    local deadline state resumed=0
    deadline=$(($(date +%s) + READY_TIMEOUT_S))
    while :; do
        state="$(node_state || true)"
        case "$state" in
            idle | mix | alloc | comp) return 0 ;;
            down* | drain* | drng*)
                # Leftover DOWN/DRAIN from an earlier run (or a slurmd restart): return it to service.
                if [ "$resumed" = 0 ] && pid_alive "$SLURMD_PID" slurmd; then
                    say "node $NODE_NAME is '$state', resuming it"
                    timeout 10 scontrol update NodeName="$NODE_NAME" State=RESUME >&2 2>&1 || true
                    resumed=1
                fi
                ;;
        esac
        pid_alive "$CTLD_PID" slurmctld || die "slurmctld exited (node state '$state')"
        pid_alive "$SLURMD_PID" slurmd || die "slurmd exited (node state '$state')"
        if [ "$(date +%s)" -ge "$deadline" ]; then
            die "node $NODE_NAME not idle after ${READY_TIMEOUT_S}s (state '$state')"
        fi
        sleep 1
    done
}

cmd_up() {
    [ "$(id -u)" = 0 ] || { say "must run as root"; exit 1; }
    install_packages
    start_munge
    write_config

    mkdir -p "$RUN_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
    chmod 0755 "$RUN_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"

    if [ "$CONFIG_CHANGED" = 1 ]; then
        # Daemons that run with another configuration (hostname changed, leftovers of another setup)
        # must be restarted to pick the new one up.
        stop_pidfile "$SLURMD_PID" slurmd
        stop_pidfile "$CTLD_PID" slurmctld
    fi

    if ! pid_alive "$CTLD_PID" slurmctld; then
        rm -f "$CTLD_PID"
        say "starting slurmctld (clearing saved state)"
        # -c: start clean, whatever jobs or node states an earlier session left in the spool.
        start_detached slurmctld /usr/sbin/slurmctld -c -f "$SLURM_CONF_FILE" \
            || die "slurmctld failed to start"
        local i
        for i in $(seq 1 50); do
            pid_alive "$CTLD_PID" slurmctld && break
            sleep 0.2
        done
        pid_alive "$CTLD_PID" slurmctld || die "slurmctld did not write $CTLD_PID"
    fi
    if ! pid_alive "$SLURMD_PID" slurmd; then
        rm -f "$SLURMD_PID"
        say "starting slurmd"
        start_detached slurmd /usr/sbin/slurmd -f "$SLURM_CONF_FILE" || die "slurmd failed to start"
        local j
        for j in $(seq 1 50); do
            pid_alive "$SLURMD_PID" slurmd && break
            sleep 0.2
        done
        pid_alive "$SLURMD_PID" slurmd || die "slurmd did not write $SLURMD_PID"
    fi

    wait_ready
    say "cluster up: node $NODE_NAME ($(node_state)), partition $PARTITION"
    print_exports
}

cmd_down() {
    # Best effort: cancel jobs still queued or running so that no job steps outlive the daemons.
    if pid_alive "$CTLD_PID" slurmctld && command -v squeue >/dev/null 2>&1; then
        local jobs
        jobs="$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)"
        if [ -n "${jobs// /}" ]; then
            say "cancelling leftover jobs: $jobs"
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs >&2 2>&1 || true
            sleep 2
        fi
    fi
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
    stop_pidfile "$MUNGE_PID" munged
    return 0
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down || true ;;
    *)
        say "usage: bash .ci/slurm.sh up|down"
        exit 2
        ;;
esac
