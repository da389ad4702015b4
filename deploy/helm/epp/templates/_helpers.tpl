{{/* Names follow the upstream inferencepool chart: the pool is the release, the EPP is
"<release>-epp" (release truncated to 40 characters). */}}
{{- define "epp.poolName" -}}
{{- .Release.Name -}}
{{- end -}}

{{- define "epp.name" -}}
{{- printf "%s-epp" (.Release.Name | lower | trim | trunc 40) -}}
{{- end -}}

{{/* Cluster-scoped objects carry the namespace so that releases in several namespaces
do not collide. */}}
{{- define "epp.clusterName" -}}
{{- printf "%s-%s-epp" (.Release.Name | lower | trim | trunc 40) (.Release.Namespace | lower | trim | trunc 40) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "epp.labels" -}}
app.kubernetes.io/name: {{ include "epp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "epp.selectorLabels" -}}
inferencepool: {{ include "epp.name" . }}
{{- end -}}

{{/* The pool's API group, from inferencePool.apiVersion. */}}
{{- define "epp.poolGroup" -}}
{{- (split "/" .Values.inferencePool.apiVersion)._0 -}}
{{- end -}}

{{- define "epp.leaderElection" -}}
{{- $le := .Values.inferenceExtension.leaderElection -}}
{{- if (.Values.inferenceExtension.stateSync | default (dict)).enabled -}}
{{- /* active-active: every replica serves */ -}}
{{- else if eq (toString $le) "auto" -}}
{{- if gt (int .Values.inferenceExtension.replicas) 1 }}true{{ end -}}
{{- else if $le -}}true{{- end -}}
{{- end -}}

{{/* Active-active with 2+ replicas: a disruption budget and spreading over nodes. */}}
{{- define "epp.activeActive" -}}
{{- if and (.Values.inferenceExtension.stateSync | default (dict)).enabled (ge (int .Values.inferenceExtension.replicas) 2) }}true{{ end -}}
{{- end -}}

{{/* registry/repository:tag (upstream v1.1+), or hub/name:tag (upstream v1.0). */}}
{{- define "epp.image" -}}
{{- $i := .Values.inferenceExtension.image -}}
{{- $tag := include "epp.scalar" $i.tag -}}
{{- if $i.hub -}}
{{- printf "%s/%s:%s" $i.hub (required "inferenceExtension.image.name is required with image.hub" $i.name) $tag -}}
{{- else if $i.registry -}}
{{- printf "%s/%s:%s" $i.registry $i.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" $i.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The metrics token secret: upstream v1.1+ auth.secretName, or v1.0's secret.name. */}}
{{- define "epp.metricsSecretName" -}}
{{- $m := .Values.inferenceExtension.monitoring -}}
{{- if and $m.secret $m.secret.name -}}{{ $m.secret.name }}{{- else -}}{{ $m.prometheus.auth.secretName }}{{- end -}}
{{- end -}}

{{/* This EPP's flags (epp --help). tests/unit/test_deploy_manifests.py keeps the list
equal to the parser's. */}}
{{- define "epp.knownFlags" -}}
{{- list "grpc-port" "grpc-health-port" "metrics-port" "metrics-endpoint-auth" "bind-address" "secure-serving" "cert-path" "pool-name" "pool-namespace" "pool-group" "config-file" "config-text" "v" "endpoints" "endpoints-file" "endpoint-selector" "endpoint-target-ports" "kubeconfig" "ha-enable-leader-election" "objectives-file" "refresh-metrics-interval" "metrics-staleness-threshold" "refresh-prometheus-metrics-interval" "model-server-metrics-scheme" "model-server-metrics-path" "model-server-metrics-port" "model-server-metrics-https-insecure-skip-verify" "max-body-bytes" "drain-timeout" "metrics-label-cap" "passive-health-consecutive-failures" "passive-health-cooldown" "extproc-max-streams" "extproc-request-idle-timeout" "extproc-response-idle-timeout" "log-format" "zap-encoder" "tracing" "state-sync" "state-sync-key" "state-sync-interval" "state-sync-ttl" | toJson -}}
{{- end -}}

{{/* Flags the chart sets itself, with the value to set instead. */}}
{{- define "epp.ownedFlags" -}}
{{- dict "pool-name" "the release name" "pool-namespace" "the release namespace" "pool-group" "inferencePool.apiVersion" "grpc-port" "inferenceExtension.extProcPort" "grpc-health-port" "inferenceExtension.healthPort" "metrics-port" "inferenceExtension.metricsPort" "config-file" "inferenceExtension.pluginsConfigFile" "config-text" "inferenceExtension.pluginsCustomConfig" "ha-enable-leader-election" "inferenceExtension.leaderElection" "metrics-endpoint-auth" "inferenceExtension.monitoring.prometheus.auth.enabled" "state-sync" "inferenceExtension.stateSync" "tracing" "inferenceExtension.tracing.enabled" | toJson -}}
{{- end -}}

{{/* inferenceExtension.flags as a list of {name, value}, from either upstream form. */}}
{{- define "epp.flagList" -}}
{{- $flags := .Values.inferenceExtension.flags | default (dict) -}}
{{- $out := list -}}
{{- if kindIs "slice" $flags -}}
{{- range $flags }}{{ $out = append $out (dict "name" (toString .name) "value" .value) }}{{ end -}}
{{- else -}}
{{- range $k, $v := $flags }}{{ $out = append $out (dict "name" $k "value" $v) }}{{ end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* A scalar as text, integral numbers without a fraction (values can arrive as float64). */}}
{{- define "epp.scalar" -}}
{{- if kindIs "float64" . -}}
{{- if eq (float64 (int64 .)) . }}{{ int64 . }}{{ else }}{{ . }}{{ end -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* An EndpointPickerConfig text with data.defaultEngine set from modelServerType unless
it names one itself. */}}
{{- define "epp.withEngine" -}}
{{- $doc := fromYaml .text -}}
{{- if hasKey $doc "Error" -}}
{{- fail (printf "inferenceExtension.pluginsCustomConfig.%s is not valid YAML: %s" .key $doc.Error) -}}
{{- end -}}
{{- $data := $doc.data | default (dict) -}}
{{- if not (hasKey $data "defaultEngine") -}}
{{- $_ := set $data "defaultEngine" .engine -}}
{{- end -}}
{{- $_ := set $doc "data" $data -}}
{{- toYaml $doc -}}
{{- end -}}

{{/* Checks the schema cannot express; each failure names the value at fault. */}}
{{- define "epp.validate" -}}
{{- $v := .Values -}}
{{- if not $v.inferencePool.modelServers.matchLabels -}}
{{- fail "inferencePool.modelServers.matchLabels is required (the labels of the model-server pods, e.g. --set inferencePool.modelServers.matchLabels.app=vllm-llama3-8b-instruct)" -}}
{{- end -}}
{{- $file := $v.inferenceExtension.pluginsConfigFile -}}
{{- if and (ne $file "default-plugins.yaml") (not (hasKey ($v.inferenceExtension.pluginsCustomConfig | default (dict)) $file)) -}}
{{- fail (printf "inferenceExtension.pluginsConfigFile %q is neither default-plugins.yaml nor a key of inferenceExtension.pluginsCustomConfig" $file) -}}
{{- end -}}
{{- $sync := $v.inferenceExtension.stateSync | default (dict) -}}
{{- if and $sync.enabled (eq (toString $v.inferenceExtension.leaderElection) "true") -}}
{{- fail "inferenceExtension.stateSync.enabled (active-active, every replica serves) excludes inferenceExtension.leaderElection=true" -}}
{{- end -}}
{{- if and $sync.enabled (not $sync.existingSecret) -}}
{{- fail "inferenceExtension.stateSync.enabled needs inferenceExtension.stateSync.existingSecret: a Secret holding the Redis URL" -}}
{{- end -}}
{{- $known := include "epp.knownFlags" . | fromJsonArray -}}
{{- $owned := include "epp.ownedFlags" . | fromJson -}}
{{- range (include "epp.flagList" . | fromJsonArray) -}}
{{- if hasKey $owned .name -}}
{{- fail (printf "inferenceExtension.flags.%s: the chart sets --%s; set %s instead" .name .name (get $owned .name)) -}}
{{- end -}}
{{- if not (has .name $known) -}}
{{- fail (printf "inferenceExtension.flags.%s: this EPP has no flag --%s (see epp --help)" .name .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
