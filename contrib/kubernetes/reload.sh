#!/usr/bin/env bash
# Apply contrib/kubernetes/configmap.yaml and reload every pod of the Deployment with
# `handoff reload`, one pod at a time: no pod restarts, no rollout.
#
#   ./reload.sh [NAMESPACE]
#
# For each pod: wait until the kubelet has written the new app.env into the pod (it
# syncs mounted ConfigMaps within about a minute), then `handoff reload`, which waits
# until the new generation serves (exit 0) or has failed (exit 1, the old generation
# still serving). A failure stops the script: the remaining pods keep the old settings.
set -euo pipefail
namespace=${1:-default}
here=$(dirname "$0")

kubectl -n "$namespace" apply -f "$here/configmap.yaml"
wanted=$(kubectl -n "$namespace" get configmap myapp-env -o 'jsonpath={.data.app\.env}')

for pod in $(kubectl -n "$namespace" get pods -l app=myapp -o name); do
    echo "== $pod"
    for _ in $(seq 1 120); do
        seen=$(kubectl -n "$namespace" exec "$pod" -- cat /etc/myapp/app.env)
        [[ "$seen" == "$wanted" ]] && break
        sleep 1
    done
    [[ "$seen" == "$wanted" ]] || { echo "$pod: the new app.env never arrived" >&2; exit 1; }
    kubectl -n "$namespace" exec "$pod" -- handoff reload
done
