{{/* Names: <release>-myriad, and <release>-myriad-<component> for each role.
At most 44 characters, so that the longest StatefulSet (`-kvcache`) stays
within 52: its pods' controller-revision-hash label adds 11 to reach 63. */}}
{{- define "myriad.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 44 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 44 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 44 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A component's name; call with (dict "root" $ "component" "worker"). */}}
{{- define "myriad.component" -}}
{{- printf "%s-%s" (include "myriad.fullname" .root) .component -}}
{{- end -}}

{{- define "myriad.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{ include "myriad.selector" . }}
{{- end -}}

{{/* The labels a component's selector matches. */}}
{{- define "myriad.selector" -}}
app.kubernetes.io/name: {{ default .root.Chart.Name .root.Values.nameOverride }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "myriad.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "myriad.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image of a role; call with (dict "root" $ "image" .Values.worker.image). */}}
{{- define "myriad.image" -}}
{{- $repo := .root.Values.image.repository -}}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag -}}
{{- if and .image .image.repository -}}{{- $repo = .image.repository -}}{{- end -}}
{{- if and .image .image.tag -}}{{- $tag = .image.tag -}}{{- end -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{/* Where the nodes find etcd: the given endpoints, or the bundled one's Service. */}}
{{- define "myriad.etcdEndpoints" -}}
{{- if .Values.etcd.endpoints -}}
{{- join "," .Values.etcd.endpoints -}}
{{- else -}}
{{- printf "http://%s:2379" (include "myriad.component" (dict "root" . "component" "etcd")) -}}
{{- end -}}
{{- end -}}

{{/*
A role's `config` as command-line flags, one list item each: camelCase keys
become --kebab-case flags; null leaves a flag out; true gives a bare flag;
whole numbers print without a decimal point (YAML numbers are floats).
*/}}
{{- define "myriad.flags" -}}
{{- range $key, $value := . }}
{{- if kindIs "bool" $value }}
{{- if $value }}
- {{ printf "--%s" (kebabcase $key) | quote }}
{{- end }}
{{- else if and (kindIs "float64" $value) (eq $value (float64 (int64 $value))) }}
- {{ printf "--%s=%d" (kebabcase $key) (int64 $value) | quote }}
{{- else if not (kindIs "invalid" $value) }}
- {{ printf "--%s=%v" (kebabcase $key) $value | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The environment every Myriad container shares. */}}
{{- define "myriad.env" -}}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
- name: MYRIAD_NODE_ID
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: MYRIAD_ETCD
  value: {{ include "myriad.etcdEndpoints" . | quote }}
- name: MYRIAD_CLUSTER
  value: {{ .Values.cluster.name | quote }}
- name: MYRIAD_LEASE_TTL
  value: {{ .Values.cluster.leaseTtl | quote }}
- name: MYRIAD_MODEL
  value: {{ .Values.model.path | quote }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- include "myriad.securityEnv" . }}
{{- if .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
{{- end }}
{{- if .Values.otel.traceFilter }}
- name: MYRIAD_TRACE_FILTER
  value: {{ .Values.otel.traceFilter | quote }}
{{- end }}
{{- end -}}

{{/* The name on every role's certificate, which clients check. */}}
{{- define "myriad.tlsServerName" -}}
{{- default (include "myriad.component" (dict "root" . "component" "internal")) .Values.tls.serverName -}}
{{- end -}}

{{/* A role's TLS Secret; call with (dict "root" $ "component" "worker"). */}}
{{- define "myriad.tlsSecret" -}}
{{- default (printf "%s-tls" (include "myriad.component" .)) (index .root.Values.tls.secrets .component) -}}
{{- end -}}

{{/* TLS and etcd login settings, as files mounted by myriad.tlsMount. */}}
{{- define "myriad.securityEnv" -}}
{{- if .Values.tls.enabled }}
- name: MYRIAD_TLS_CERT
  value: /etc/myriad/tls/tls.crt
- name: MYRIAD_TLS_KEY
  value: /etc/myriad/tls/tls.key
- name: MYRIAD_TLS_CA
  value: /etc/myriad/tls/ca.crt
- name: MYRIAD_TLS_SERVER_NAME
  value: {{ include "myriad.tlsServerName" . | quote }}
{{- if .Values.tls.requireClientCert }}
- name: MYRIAD_TLS_REQUIRE_CLIENT_CERT
  value: "true"
{{- end }}
{{- end }}
{{- if .Values.etcd.tls.secret }}
- name: MYRIAD_ETCD_CA
  value: /etc/myriad/etcd-tls/ca.crt
{{- if .Values.etcd.tls.clientCert }}
- name: MYRIAD_ETCD_CERT
  value: /etc/myriad/etcd-tls/tls.crt
- name: MYRIAD_ETCD_KEY
  value: /etc/myriad/etcd-tls/tls.key
{{- end }}
{{- end }}
{{- with .Values.etcd.auth.user }}
- name: MYRIAD_ETCD_USER
  value: {{ . | quote }}
- name: MYRIAD_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ required "etcd.auth.passwordSecret.name is required with etcd.auth.user" $.Values.etcd.auth.passwordSecret.name | quote }}
      key: {{ $.Values.etcd.auth.passwordSecret.key | quote }}
{{- end }}
{{- end -}}

{{/* The volumes of myriad.securityEnv's files; call with (dict "root" $ "component" "worker"). */}}
{{- define "myriad.tlsVolume" -}}
{{- if .root.Values.tls.enabled }}
- name: tls
  secret: {secretName: {{ include "myriad.tlsSecret" . | quote }}}
{{- end }}
{{- with .root.Values.etcd.tls.secret }}
- name: etcd-tls
  secret: {secretName: {{ . | quote }}}
{{- end }}
{{- end -}}

{{- define "myriad.tlsMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/myriad/tls
  readOnly: true
{{- end }}
{{- if .Values.etcd.tls.secret }}
- name: etcd-tls
  mountPath: /etc/myriad/etcd-tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* MYRIAD_ADMIN_TOKEN from its Secret, when one is configured. */}}
{{- define "myriad.adminTokenEnv" -}}
{{- $t := .Values.coordinator.adminToken -}}
{{- if or $t.existingSecret $t.value }}
- name: MYRIAD_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ default (include "myriad.component" (dict "root" . "component" "admin-token")) $t.existingSecret }}
      key: {{ $t.key }}
{{- end }}
{{- end -}}

{{/* The model folder's volume and mount, unless it is in the image. */}}
{{- define "myriad.modelVolume" -}}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim: {claimName: {{ required "model.claimName is required when model.source is pvc" .Values.model.claimName | quote }}, readOnly: true}
{{- else if eq .Values.model.source "hostPath" }}
- name: model
  hostPath: {path: {{ required "model.hostPath is required when model.source is hostPath" .Values.model.hostPath | quote }}, type: Directory}
{{- end }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "myriad.modelMount" -}}
{{- if ne .Values.model.source "image" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Pod-level settings every role shares; call with (dict "root" $ "role" .Values.worker). */}}
{{- define "myriad.podSpec" -}}
serviceAccountName: {{ include "myriad.serviceAccountName" .root }}
automountServiceAccountToken: false
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
securityContext: {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .role.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- if not (kindIs "invalid" .role.terminationGracePeriodSeconds) }}
terminationGracePeriodSeconds: {{ int .role.terminationGracePeriodSeconds }}
{{- end }}
{{- end -}}
