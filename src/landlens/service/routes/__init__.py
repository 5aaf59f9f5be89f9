"""The routes of the service, one router per area: the page and its assets
(:mod:`~landlens.service.routes.page`), service information and classification
(:mod:`~landlens.service.routes.info`), searches (:mod:`~landlens.service.routes.search`) and
archive images (:mod:`~landlens.service.routes.images`)."""
