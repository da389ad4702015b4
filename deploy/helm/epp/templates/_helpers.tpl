{{- define "epp.name" -}}
{{- default (printf "%s-epp" .Values.inferencePool.name) .Values.epp.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "epp.labels" -}}
app.kubernetes.io/name: epp
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "epp.selectorLabels" -}}
app: {{ include "epp.name" . }}
{{- end -}}

{{- define "epp.validate" -}}
{{- $p := .Values.provider.name -}}
{{- if not (has $p (list "none" "gke" "istio")) -}}
{{- fail (printf "provider.name must be none, gke or istio, not %q" $p) -}}
{{- end -}}
{{- if not (has .Values.inferencePool.group (list "inference.networking.k8s.io" "inference.networking.x-k8s.io")) -}}
{{- fail "inferencePool.group must be inference.networking.k8s.io or inference.networking.x-k8s.io" -}}
{{- end -}}
{{- if not .Values.inferencePool.targetPorts -}}
{{- fail "inferencePool.targetPorts needs at least one port" -}}
{{- end -}}
{{- end -}}
