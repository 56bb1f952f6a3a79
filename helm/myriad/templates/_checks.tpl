{{/*
Mistakes between fields that the schema cannot see, refused at render time
with what to change (included once, from coordinator.yaml).
*/}}
{{- define "myriad.checks" -}}
{{- $workers := int .Values.worker.replicas -}}
{{- $c := .Values.coordinator.config -}}
{{- if gt (int $c.minWorkers) $workers -}}
{{- fail (printf "coordinator.config.minWorkers (%d) exceeds worker.replicas (%d): the first placement would wait forever" (int $c.minWorkers) $workers) -}}
{{- end -}}
{{- if gt (int $c.replicas) $workers -}}
{{- fail (printf "coordinator.config.replicas (%d) exceeds worker.replicas (%d): every expert needs that many workers" (int $c.replicas) $workers) -}}
{{- end -}}
{{- $hpa := .Values.router.autoscaling -}}
{{- if and $hpa.enabled (gt (int $hpa.minReplicas) (int $hpa.maxReplicas)) -}}
{{- fail (printf "router.autoscaling.minReplicas (%d) exceeds maxReplicas (%d)" (int $hpa.minReplicas) (int $hpa.maxReplicas)) -}}
{{- end -}}
{{- range $role := list "coordinator" "worker" "router" "kvcache" -}}
{{- $resources := (index $.Values $role).resources -}}
{{- range $kind := list "requests" "limits" -}}
{{- range $name, $_ := (index $resources $kind | default dict) -}}
{{- if not (or (has $name (list "cpu" "memory" "ephemeral-storage")) (hasPrefix "hugepages-" $name) (contains "/" $name)) -}}
{{- fail (printf "%s.resources.%s.%s: extended resources need their vendor's domain, e.g. nvidia.com/gpu" $role $kind $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
